"""Model weights on disk and on the wire: safetensors I/O, Hugging Face folders, sharded output,
Flower ArrayRecords.
"""
