"""Small builders shared by the stage tests."""

import torch


def tiny_model(tokenizer, dropout=0.0, path=None, seed=0):
    """A random two-layer GPT-NeoX over `tokenizer` (a few spare embedding rows), saved with it when `path` is given."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=len(tokenizer) + 8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256, attention_dropout=dropout, hidden_dropout=dropout,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = GPTNeoXForCausalLM(config)
    if path:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return model
