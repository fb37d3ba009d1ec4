"""Model components: layers.py (attention, MLP, norms, the initialisation recipes),
transformer.py (BERT / GPT stacks and their LM heads), vision.py (ViT, ResNet, the image
classifier), multimodal.py (two towers, fusion), heads.py (pooling, classifier heads),
flops.py (the training FLOPs of each)."""
