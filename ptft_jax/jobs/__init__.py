"""What each kind of job prepares before the loop runs: common.py (tokenizer, vocabulary,
`init_from`), lm.py (pretraining text), labelled.py (finetuning on labelled text),
images.py, pairs.py (image-text pairs); entry.py is `ptft pretrain` / `ptft finetune`."""
