"""What people read: the analysis report (:mod:`.report`), before / after comparisons
(:mod:`.compare`), size and speed measures (:mod:`.measure`) and pictures of the channel
graph (:mod:`.visualize`)."""
