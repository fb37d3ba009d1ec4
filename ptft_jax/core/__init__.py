"""What every layer above builds on: parameter paths and rules (params.py), the train state
(state.py), the device mesh and multi-host helpers (mesh.py), LoRA as a parameter transform
(lora.py)."""
