"""What people read that no analysis holds: size and speed measures (:mod:`.measure`),
plain-text tables (:mod:`.tables`) and pictures of the channel graph (:mod:`.visualize`).
The analysis report is :mod:`graphprune.analysis.report`; before / after comparisons,
which analyse the model, are :mod:`graphprune.workflow.compare`."""
