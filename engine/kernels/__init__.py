"""Engine ops: one Triton kernel per file, each with its plain-torch twin in reference.py; `ops` picks one."""
