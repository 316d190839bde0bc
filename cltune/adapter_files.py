"""The files of one stored adapter version: peft's two, and cltune's record (written last, so a version
whose record exists is complete; the artifact store publishes it last for the same reason).

A leaf module (no imports), so the store, the registry, export, import and serving share the names
without loading torch."""

CONFIG = "adapter_config.json"  # peft's LoraConfig
WEIGHTS = "adapter_model.safetensors"  # peft's tensors
RECORD = "record.json"  # cltune.registry.AdapterRecord
PEFT_FILES = (CONFIG, WEIGHTS)
