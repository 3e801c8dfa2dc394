"""Stage 3, pruning: which channels go (:mod:`.planner`, :mod:`.budget`), taking them out of
every member in one transaction (:mod:`.surgery`), and checking the result (:mod:`.audit`)."""
