"""A LLaDA-shaped model that ships its own code (``trust_remote_code``), for tests: dlm must drive
a checkpoint it does not own — no output_mask, no KV cache — through decoding, RL and LoRA."""

from transformers import PretrainedConfig


class TinyLLaDAConfig(PretrainedConfig):
    model_type = "tiny_llada"

    def __init__(self, vocab_size=288, d_model=32, n_layers=2, n_heads=4, mask_token_id=None, **kwargs):
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        self.mask_token_id = mask_token_id
        self.max_position_embeddings = 512
        super().__init__(**kwargs)
