"""What lives on disk or crosses to other libraries: the run store, Hugging Face and GPT-2 interop, the
model folders the dashboard may open.
"""
