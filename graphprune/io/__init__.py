"""Saving a pruned model and loading it into a freshly built one (:mod:`.persist`)."""
