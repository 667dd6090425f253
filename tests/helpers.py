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


WORDS = "alpha beta gamma delta echo foxtrot golf hotel india juliet kilo lima".split()


def write_sft_rows(raw_dir, counts):
    """Raw TL;DR SFT rows (id, subreddit, title, post, summary) as `{split}.jsonl` files, `counts` = {split: n}."""
    import json

    raw_dir.mkdir()
    for split, n in counts.items():
        with open(raw_dir / f"{split}.jsonl", "w") as f:
            for i in range(n):
                w = WORDS[i % len(WORDS)]
                f.write(json.dumps(dict(id=f"{split}{i}", subreddit="test", title=f"about {w}",
                                        post=f"I keep thinking about {w}.\nIt is {w} all day.", summary=f"{w} all day")) + "\n")
