"""Around pruning: fine-tuning and evaluation (:mod:`.finetune`), iterative schedules
(:mod:`.schedule`), per-group sensitivity (:mod:`.sensitivity`), group-level sparse training
before pruning (:mod:`.sparse`) and ``torch.distributed`` helpers (:mod:`.distributed`)."""
