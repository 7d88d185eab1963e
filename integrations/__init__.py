"""Host integrations for sparse_attn (installed as ``sparse_attn.integrations``).

Thin adapters that register sparse attention through the hosts' own seams: Hugging Face
transformers (``AttentionInterface``) and vLLM (its plugin / attention-backend registry). Each
optional dependency is imported lazily, inside the adapter that needs it.
"""
