"""Stage 2, analysis: the channel graph, the rules that propagate channel identity through it,
and the coupled groups they leave.

* :mod:`.channels`: channel ids and their equivalence classes;
* :mod:`.propagation`: the state the rules share while walking the graph;
* :mod:`.rules`: the rule table, one rule per op (add a rule there);
* :mod:`.propagate`: the walk that applies a rule to every node;
* :mod:`.groups`: the coupled channel groups;
* :mod:`.reasons`: why a group is blocked, as a kind and a message;
* :mod:`.sizes`: which module attributes hold a size or a head count;
* :mod:`.inputs`: example inputs inferred from what a model declares;
* :mod:`.analyzer`: one analysis of one model, from trace to groups.
"""
