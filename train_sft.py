"""Next-token training: base-model pre-training and supervised fine-tuning (Llama 2, sections 2 and 3.1).

--stage base: trains the decoder from scratch on the world's unaligned corpus; the loss is the next-token
    cross-entropy on every token, L = -1/N sum_t log p(x_t | x_<t).
--stage sft: starts from a checkpoint (--init) and fine-tunes on chat dialogues in the Llama 2 template; as in
    the paper, the loss is on answer tokens only (prompt tokens are masked), L = -1/|A| sum_{t in A} log p(x_t | x_<t).
    --gatt adds Ghost Attention dialogues (section 3.3); distill.py builds them from a model's own samples.

Deviation from the paper: Llama 2 packs SFT examples into 4096-token sequences; here each dialogue is its own
padded row (the tiny preset's dialogues are short, so packing would save little and cost readability).

Tiny CPU run (minutes):
    python train_sft.py --stage base --preset tiny --out out/base
    python train_sft.py --stage sft --preset tiny --init out/base/model.pt --out out/sft
Data parallel:
    torchrun --nproc_per_node=2 train_sft.py --stage sft --preset tiny --init out/base/model.pt --out out/sft
"""
import argparse
import math
import os
import random

import torch
from tqdm import tqdm

import data
import runtime
import tokenizer
import world
from model import ModelConfig, Transformer, generate, load_model, masked_nll, save_checkpoint

# Model sizes: "tiny" is sized so base + SFT finish in a few CPU minutes; "small" is a 124M-class GPU model;
# "1b" is Llama-architecture at 1B parameters (the shape of TinyLlama-1.1B: 22 layers, 2048 wide, 4 KV heads).
MODEL_PRESETS = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=192),
    "small": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=512),
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, max_seq_len=1024),
}
PRESETS = {
    "tiny": dict(steps_base=300, steps_sft=150, batch_size=32, lr_base=3e-3, lr_sft=1e-3, eval_every=100,
                 warmup=50, **MODEL_PRESETS["tiny"]),
    "small": dict(steps_base=5000, steps_sft=1000, batch_size=64, lr_base=6e-4, lr_sft=2e-5, eval_every=500,
                  warmup=200, **MODEL_PRESETS["small"]),
    "1b": dict(steps_base=20000, steps_sft=2000, batch_size=64, lr_base=3e-4, lr_sft=2e-5, eval_every=1000,
               warmup=500, **MODEL_PRESETS["1b"]),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="default sizes and schedule")
    p.add_argument("--stage", choices=("base", "sft"), required=True, help="base: all tokens; sft: answer tokens only")
    p.add_argument("--out", required=True, help="output folder (model.pt, config.json, metrics.jsonl)")
    p.add_argument("--init", default=None, help="checkpoint to start from (required for --stage sft)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/model.pt (step, optimizer, RNG)")
    # data
    p.add_argument("--data", default="world", help="'world' (embedded) or a JSONL file: base {'text'}, "
                   "sft {'messages': [{role, content}, ...]} or {'prompt', 'response'}")
    p.add_argument("--gatt", action="store_true", help="sft: add the world's Ghost Attention dialogues")
    p.add_argument("--tokenizer", default="world", help="base: 'world' (BPE trained on the world, cached) or a "
                   ".tiktoken file; sft takes the tokenizer of --init")
    p.add_argument("--vocab-size", type=int, default=2048, help="vocabulary of the world BPE tokenizer")
    # model (base stage; sft reads the architecture from --init)
    p.add_argument("--dim", type=int, help="model width")
    p.add_argument("--n-layers", type=int, help="transformer blocks")
    p.add_argument("--n-heads", type=int, help="query heads")
    p.add_argument("--n-kv-heads", type=int, help="key/value heads (grouped-query attention)")
    p.add_argument("--max-seq-len", type=int, help="context length in tokens; longer examples are cut")
    p.add_argument("--tie-embeddings", action="store_true", help="share input embedding and output head")
    # optimisation
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: preset's for the stage)")
    p.add_argument("--batch-size", type=int, help="global batch in sequences per optimizer step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch is split into them)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: preset's for the stage)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices (Llama 2: 0.1)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (Llama 2: 1.0)")
    # bookkeeping
    p.add_argument("--eval-every", type=int, help="steps between held-out loss evaluations and samples")
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = runtime.parse_args(p, PRESETS, argv)
    if args.steps is None:
        args.steps = args.steps_base if args.stage == "base" else args.steps_sft
    if args.lr is None:
        args.lr = args.lr_base if args.stage == "base" else args.lr_sft
    return args


def load_text_data(args, tok):
    """Rows of token ids and loss masks for the stage, split into train and held-out."""
    if args.stage == "base":
        if args.data == "world":
            docs = world.build_world(args.seed).corpus
        else:
            docs = [r["text"] for r in data.read_jsonl(args.data, required=("text",))]
        encoded = [tok.encode(d) for d in docs]
        val_docs = encoded[::20]  # every 20th document is held out for the eval loss
        train_docs = [d for i, d in enumerate(encoded) if i % 20]
        # One packing of a fixed document order lets a small model memorise each window (a fact recalled by
        # its neighbours, not by its subject); so every pass over the corpus is packed from a fresh shuffle.
        rows_per_pass = max(1, sum(len(d) + 1 for d in train_docs) // args.max_seq_len)
        passes = math.ceil(args.steps * args.batch_size / rows_per_pass)
        order_rng = random.Random(args.seed)
        train = torch.cat([data.pack_tokens(order_rng.sample(train_docs, len(train_docs)), args.max_seq_len, tok.eos_id)
                           for _ in range(passes)])
        val = data.pack_tokens(val_docs, args.max_seq_len, tok.eos_id)
        return [(r.tolist(), [1] * len(r)) for r in train], [(r.tolist(), [1] * len(r)) for r in val]
    if args.data == "world":
        w = world.build_world(args.seed)
        dialogs = list(w.sft)
        if args.gatt:
            dialogs += [data.gatt_dialog(d) for d in w.gatt_dialogs()]
        # held-out: test prompts with their gold responses (never trained on)
        gold_rng = random.Random(0)
        val_dialogs = [ex.messages + [{"role": "assistant", "content": w.gold_response(ex, gold_rng)}]
                       for ex in w.test[::4]]
    else:
        dialogs = [data.as_dialog(row, f"{args.data}:{line}") for line, row in data.read_jsonl(args.data, with_lines=True)]
        val_dialogs = dialogs[::20]
        dialogs = [d for i, d in enumerate(dialogs) if i % 20]
    return data.encode_sft(tok, dialogs, args.max_seq_len), data.encode_sft(tok, val_dialogs, args.max_seq_len)


def batch_loss(model, batch, rt, n_tokens):
    """Sum of the masked next-token loss over this micro-batch, divided by the global token count.

    Dividing by the token count of the whole global batch (all micro-batches, all ranks) makes the gradient
    the same whatever the split into micro-batches and processes; DDP averages over ranks, hence * world_size.
    """
    tokens, attn, mask = batch["tokens"], batch["attention_mask"], batch["loss_mask"]
    with runtime.autocast(rt):
        logits = model(tokens[:, :-1], attention_mask=attn[:, :-1])
    targets_mask = mask[:, 1:] * attn[:, 1:]
    n_here = targets_mask.sum()
    return masked_nll(logits.float(), tokens[:, 1:], targets_mask) * n_here / n_tokens * rt.world_size


@torch.no_grad()
def eval_loss(model, rows, tok, rt, batch_size=64):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = {k: v.to(rt.device) for k, v in data.collate([r[0] for r in chunk], tok.pad_id, [r[1] for r in chunk]).items()}
        n = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).sum()
        total += batch_loss(model, batch, rt, n).item() / rt.world_size * n.item()
        count += n.item()
    model.train()
    return total / max(count, 1)


def main(args):
    # ------------------------------------------------------------------ setup
    rt, ckpt_path, resume = runtime.start(args)
    if args.stage == "sft" and args.init is None and resume is None:
        raise SystemExit("--stage sft needs --init CHECKPOINT (the base model to fine-tune)")

    # ------------------------------------------------------------------ model and tokenizer
    if resume is not None and resume.get("stage") != args.stage:
        raise SystemExit(f"{ckpt_path} holds a {resume.get('stage')!r} stage checkpoint; --resume of --stage "
                         f"{args.stage} needs one this stage wrote (or use another --out)")
    if resume is not None or args.init:
        model, ckpt = load_model(resume if resume is not None else args.init, rt.device)
        tok = tokenizer.Tokenizer.from_dict(ckpt["tokenizer"])
        source = ckpt_path if resume is not None else args.init
        if model.config.head != "lm":
            raise SystemExit(f"{source}: a model with a {model.config.head!r} head (a reward or value model); "
                             f"next-token training needs a language model (head 'lm')")
        if tok.vocab_size > model.config.vocab_size:
            raise SystemExit(f"{source}: its tokenizer has {tok.vocab_size} tokens but the model's embedding has "
                             f"{model.config.vocab_size} rows; the checkpoint pairs a model with another tokenizer")
    else:
        tok = tokenizer.load_tokenizer(args.tokenizer, vocab_size=args.vocab_size)
        config = ModelConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                             n_kv_heads=args.n_kv_heads, max_seq_len=args.max_seq_len,
                             tie_embeddings=args.tie_embeddings)
        model = Transformer(config).to(rt.device)
    args.max_seq_len = min(args.max_seq_len, model.config.max_seq_len)
    runtime.save_config(args, rt)

    # ------------------------------------------------------------------ data
    train_rows, val_rows = load_text_data(args, tok)
    if not train_rows:
        raise SystemExit(f"no training examples in {args.data}")
    runtime.print0(rt, f"{args.stage}: {len(train_rows)} train rows, {len(val_rows)} held-out rows, "
                       f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {rt.device}")

    # ------------------------------------------------------------------ optimizer and resume
    optimizer = runtime.make_optimizer(model, args.lr, args.weight_decay)
    step = runtime.resume_training(rt, optimizer, resume, ckpt_path)
    train_model = torch.compile(model) if args.compile else model
    train_model = runtime.wrap_ddp(train_model, rt)
    log = runtime.MetricsLog(os.path.join(args.out, "metrics.jsonl"), rt.is_main)
    w = world.build_world(args.seed)
    sample_prompts = [ex.messages for ex in w.test[::40]][:4]

    def save():
        if rt.is_main:
            save_checkpoint(ckpt_path, dict(model=model.state_dict(), model_config=vars(model.config),
                                            tokenizer=tok.to_dict(), step=step, optimizer=optimizer.state_dict(),
                                            rng=runtime.rng_state(), args=vars(args), stage=args.stage))

    # ------------------------------------------------------------------ training loop
    micro = args.batch_size // args.grad_accum // rt.world_size
    loss_value, metrics = None, {}
    bar = tqdm(total=args.steps, initial=step, disable=not rt.is_main, desc=args.stage)
    while step < args.steps:
        lr = runtime.cosine_lr(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = data.step_indices(len(train_rows), args.batch_size, step, args.seed, rt.rank, rt.world_size)
        rows = [train_rows[i] for i in idx]
        micro_batches = [data.collate([r[0] for r in rows[j:j + micro]], tok.pad_id, [r[1] for r in rows[j:j + micro]])
                         for j in range(0, len(rows), micro)]
        micro_batches = [{k: v.to(rt.device) for k, v in b.items()} for b in micro_batches]
        n_tokens = runtime.all_reduce_sum(sum((b["loss_mask"][:, 1:] * b["attention_mask"][:, 1:]).sum()
                                              for b in micro_batches).float(), rt)
        loss_sum = 0.0
        for j, batch in enumerate(micro_batches):
            with runtime.no_sync(train_model, last=j == len(micro_batches) - 1):
                loss = batch_loss(train_model, batch, rt, n_tokens)
                loss.backward()
            loss_sum += loss.item() / rt.world_size
        loss_value = runtime.all_reduce_sum(torch.tensor(loss_sum, device=rt.device), rt).item()
        grad_norm = runtime.optimizer_step(model, optimizer, loss_value, args.grad_clip, f"step {step}", ckpt_path)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
        metrics = dict(loss=loss_value, lr=lr, grad_norm=grad_norm.item())

        # -------------------------------------------------------------- eval, samples, checkpoint
        if step % args.eval_every == 0 or step == args.steps:
            metrics["val_loss"] = eval_loss(model, val_rows, tok, rt)
            if rt.is_main and args.stage == "sft":
                model.eval()
                outs = generate(model, [tok.encode_prompt(m) for m in sample_prompts], max_new_tokens=40,
                                eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0.0)
                model.train()
                for m, o in zip(sample_prompts, outs):
                    tqdm.write(f"  > {m[-1]['content']}\n    {tok.decode(o)}")
            runtime.print0(rt, f"step {step}: loss {loss_value:.4f} val_loss {metrics['val_loss']:.4f}")
        log.log(step, **metrics)
        if step % args.save_every == 0 or step == args.steps:
            save()
    bar.close()
    runtime.cleanup(rt)
    return dict(loss=loss_value, val_loss=metrics.get("val_loss"), step=step)


if __name__ == "__main__":
    main(get_args())
