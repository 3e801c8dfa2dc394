"""Around pruning: fine-tuning and evaluation (:mod:`.finetune`), iterative schedules
(:mod:`.schedule`), per-group sensitivity (:mod:`.sensitivity`) and ``torch.distributed``
helpers (:mod:`.distributed`)."""
