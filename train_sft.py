"""Next-token training: base-model pre-training and supervised fine-tuning (Llama 2, sections 2 and 3.1).

--stage base: trains the decoder from scratch on the world's unaligned corpus; the loss is the next-token
    cross-entropy on every token, L = -1/N sum_t log p(x_t | x_<t).
--stage sft: starts from a checkpoint (--init) and fine-tunes on chat dialogues in the Llama 2 template; as in the
    paper, the loss is on answer tokens only (prompt tokens are masked), L = -1/|A| sum_{t in A} log p(x_t | x_<t).
    --gatt adds Ghost Attention dialogues (section 3.3); distill.py builds them from a model's own samples.
    --safety-share keeps that share of the world's safety demonstrations (answers to harmful prompts), every
    other demonstration kept: the safety data scaling of section 4.2.3 (pipeline.sh --sweep runs it).
Held-out loss: every 20th corpus document (base); the world's validation prompts with their gold responses (sft,
also the source of the printed samples); with --data FILE, every 20th dialogue or the --val-data file, where
--min-val-drop checks that the loss fell from the starting model's. The test split is evaluate.py's alone.
Both losses are model.next_token_loss: the loss mask is all ones for the base stage, the answer tokens for SFT.
--chunked-loss computes the same loss block by block without the whole logits (model.chunked_nll): a faster step.

Deviation from the paper: Llama 2 packs SFT examples into 4096-token sequences; here each dialogue is its own
padded row (the tiny preset's dialogues are short, so packing would save little and cost readability).

Tiny CPU run (minutes):
    python train_sft.py --stage base --preset tiny --out out/base
    python train_sft.py --stage sft --preset tiny --init out/base/model.pt --out out/sft
    python train_sft.py --stage sft --preset tiny --init out/base/model.pt --safety-share 0.25 --out out/share_0.25
Data parallel:
    torchrun --nproc_per_node=2 train_sft.py --stage sft --preset tiny --init out/base/model.pt --out out/sft
Sharded (FSDP2), a 7B model on 8 GPUs (docs/memory.md sizes it; MODEL_7B a HF or Meta folder that loaders.py reads):
    torchrun --standalone --nproc_per_node=8 train_sft.py --stage sft --init MODEL_7B --data FILE.jsonl \\
        --fsdp --max-seq-len 4096 --batch-size 64 --grad-accum 8 --lr 2e-5 --out out/sft_7b
"""
import math
import random

import torch
from tqdm import tqdm

import data
import loaders
import model as model_lib
import runtime
import tokenizer
import world
from model import ModelConfig, Transformer

# Model sizes: "tiny" is sized so base + SFT finish in a few CPU minutes; "small" is a 124M-class GPU model;
# "1b" is Llama-architecture at 1B parameters (the shape of TinyLlama-1.1B: 22 layers, 2048 wide, 4 KV heads).
MODEL_PRESETS = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=192),
    "small": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=512),
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, max_seq_len=1024),
}
PRESETS = {
    "tiny": dict(steps_base=1500, steps_sft=150, batch_size=32, lr_base=3e-3, lr_sft=5e-4, eval_every=100,
                 warmup=50, **MODEL_PRESETS["tiny"]),
    "small": dict(steps_base=5000, steps_sft=1000, batch_size=64, lr_base=6e-4, lr_sft=2e-5, eval_every=500,
                  warmup=200, **MODEL_PRESETS["small"]),
    "1b": dict(steps_base=20000, steps_sft=2000, batch_size=64, lr_base=3e-4, lr_sft=2e-5, eval_every=1000,
               warmup=500, **MODEL_PRESETS["1b"]),
}


def get_args(argv=None):
    p = runtime.parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="default sizes and schedule")
    p.add_argument("--stage", choices=("base", "sft"), required=True, help="base: a fresh model, loss on all "
                   "tokens; sft: fine-tune --init, loss on answer tokens only")
    p.add_argument("--init", default=None, help="sft: the checkpoint to fine-tune (this project's .pt, a HF or "
                   "Meta folder, or a .gguf file); required for --stage sft, not taken by --stage base")
    runtime.add_run_arguments(p, outputs="model.pt, config.json, metrics.jsonl",
                              seed_help="random seed (model init, world, batch order)")
    runtime.add_chunked_loss_argument(p)
    runtime.add_sharding_arguments(p)
    # data
    p.add_argument("--data", default="world", help="'world' (embedded) or a JSONL file: base {'text'}, "
                   "sft {'messages': [{role, content}, ...]} or {'prompt', 'response'}")
    p.add_argument("--val-data", default=None, help="sft on a file: a JSONL file of held-out dialogues for the "
                   "validation loss (default: every 20th row of --data, left out of training)")
    p.add_argument("--gatt", action="store_true", help="sft: add the world's Ghost Attention dialogues")
    p.add_argument("--safety-share", type=runtime.nonnegative_float, default=1.0, help="sft on the world: share "
                   "of its safety demonstrations kept, 0 to 1 (smaller shares keep subsets of larger ones; benign "
                   "and borderline demonstrations are all kept; Llama 2, section 4.2.3)")
    p.add_argument("--tokenizer", default="world", help="base: 'world' (BPE trained on the world, cached) or a "
                   ".tiktoken file; sft takes the tokenizer of --init")
    p.add_argument("--vocab-size", type=runtime.positive_int, default=2048,
                   help="base: vocabulary of the world BPE tokenizer")
    # model (base stage; sft reads the architecture from --init)
    p.add_argument("--dim", type=runtime.positive_int, help="base: model width")
    p.add_argument("--n-layers", type=runtime.positive_int, help="base: transformer blocks")
    p.add_argument("--n-heads", type=runtime.positive_int, help="base: query heads")
    p.add_argument("--n-kv-heads", type=runtime.positive_int, help="base: key/value heads (grouped-query attention)")
    p.add_argument("--max-seq-len", type=runtime.positive_int, help="context length in tokens (at most the "
                   "model's); longer examples are cut (base) or skipped with a count (sft)")
    p.add_argument("--tie-embeddings", action="store_true", help="base: share input embedding and output head")
    # optimisation
    p.add_argument("--steps", type=runtime.positive_int, default=None,
                   help="optimizer steps (default: the preset's steps_base or steps_sft)")
    p.add_argument("--batch-size", type=runtime.positive_int, help="global batch in sequences per optimizer step")
    p.add_argument("--grad-accum", type=runtime.positive_int, default=1,
                   help="micro-batches per step (the batch is split into them)")
    p.add_argument("--lr", type=runtime.positive_float, default=None,
                   help="peak learning rate (default: the preset's lr_base or lr_sft)")
    p.add_argument("--min-lr-ratio", type=runtime.nonnegative_float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=runtime.nonnegative_int, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=runtime.nonnegative_float, default=0.1,
                   help="AdamW decay on matrices (Llama 2: 0.1)")
    p.add_argument("--grad-clip", type=runtime.positive_float, default=1.0, help="max gradient norm (Llama 2: 1.0)")
    # bookkeeping
    p.add_argument("--eval-every", type=runtime.positive_int,
                   help="steps between held-out loss evaluations (and, for sft, greedy samples)")
    p.add_argument("--save-every", type=runtime.positive_int, default=200, help="steps between checkpoints")
    # the stage's own check (pipeline.sh sets it for the real model)
    p.add_argument("--min-val-drop", type=runtime.nonnegative_float, default=None, help="after training (and "
                   "saving), fail unless the validation loss fell by at least this many nats per token from the "
                   "starting model's (default: no check)")
    args = runtime.parse_args(p, PRESETS, argv)
    if args.stage == "sft" and args.init is None:
        p.error("--stage sft needs --init CHECKPOINT (the base model to fine-tune)")
    if args.stage == "base" and args.init is not None:
        p.error("--init is for --stage sft; --stage base trains a fresh model")
    if args.safety_share > 1:
        p.error(f"--safety-share must be 0 to 1, got {args.safety_share}")
    if args.val_data is not None and (args.stage != "sft" or args.data == "world"):
        p.error("--val-data is for --stage sft on a --data file")
    if args.safety_share != 1 and (args.stage != "sft" or args.data != "world"):
        p.error("--safety-share is for --stage sft on --data world (the world's SFT set)")
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
        train = torch.cat([data.pack_tokens(order_rng.sample(train_docs, len(train_docs)), args.max_seq_len,
                                            tok.eos_id) for _ in range(passes)])
        val = data.pack_tokens(val_docs, args.max_seq_len, tok.eos_id)
        return [(r.tolist(), [1] * len(r)) for r in train], [(r.tolist(), [1] * len(r)) for r in val]
    if args.data == "world":
        w = world.build_world(args.seed)
        dialogs = w.sft_dialogs(args.safety_share)
        if args.gatt:
            dialogs += [data.gatt_dialog(d) for d in w.gatt_dialogs()]
        # held-out: every other validation prompt (330) with its gold response, never trained on
        gold_rng = random.Random(0)
        val_dialogs = [ex.messages + [{"role": "assistant", "content": w.gold_response(ex, gold_rng)}]
                       for ex in w.validation[::2]]
    else:
        dialogs = [data.as_dialog(row, f"{args.data}:{line}")
                   for line, row in data.read_jsonl(args.data, with_lines=True)]
        if args.val_data is not None:
            val_dialogs = [data.as_dialog(row, f"{args.val_data}:{line}")
                           for line, row in data.read_jsonl(args.val_data, with_lines=True)]
        else:
            val_dialogs = dialogs[::20]
            dialogs = [d for i, d in enumerate(dialogs) if i % 20]
    return data.encode_sft(tok, dialogs, args.max_seq_len), data.encode_sft(tok, val_dialogs, args.max_seq_len)


@torch.no_grad()
def eval_loss(model, rows, tok, rt, chunked=False, batch_size=64):
    """Mean next-token loss per target token over held-out rows (this rank's)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = {k: v.to(rt.device)
                 for k, v in data.collate([r[0] for r in chunk], tok.pad_id, [r[1] for r in chunk]).items()}
        n = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).sum()
        with runtime.autocast(rt):
            loss = model_lib.next_token_loss(model, batch["tokens"], batch["attention_mask"], batch["loss_mask"], n,
                                             rt.world_size, chunked)
        total += loss.item() / rt.world_size * n.item()
        count += n.item()
    model.train()
    return total / max(count, 1)


def new_model(args, device):
    """(model, tok) for --stage base: the tokenizer, then a freshly initialised Transformer of the flags' shape."""
    tok = tokenizer.load_tokenizer(args.tokenizer, vocab_size=args.vocab_size)
    config = ModelConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                         n_kv_heads=args.n_kv_heads, max_seq_len=args.max_seq_len, tie_embeddings=args.tie_embeddings)
    return Transformer(config).to(device), tok


def main(args):
    # ------------------------------------------------------------------ setup, model and data (read before writing)
    rt, ckpt_path, resume = runtime.start(args, stage=args.stage)
    if resume is not None or args.stage == "sft":
        model, tok, _ = loaders.load_policy(resume if resume is not None else args.init, rt.device)
    else:
        model, tok = new_model(args, rt.device)
    args.max_seq_len = min(args.max_seq_len, model.config.max_seq_len)
    train_rows, val_rows = load_text_data(args, tok)
    if not train_rows:
        raise runtime.UserError(f"no training examples in {args.data}")
    sample_prompts = [ex.messages for ex in world.build_world(args.seed).validation[::40]][:4]
    micro = runtime.micro_batch_size(args.batch_size, args.grad_accum, rt)
    runtime.print0(rt, f"{args.stage}: {len(train_rows)} train rows, {len(val_rows)} held-out rows, "
                       f"{model_lib.num_params(model) / 1e6:.2f}M parameters on {rt.device}")

    # ------------------------------------------------------------------ optimizer, resume, run folder
    runtime.distribute(model, rt, args.fsdp, args.activation_checkpointing)  # before its optimizer is built
    optimizer = runtime.make_optimizer(model, args.lr, args.weight_decay, freeze=args.freeze_layers)
    step = runtime.resume_training(rt, resume, {"optimizer": optimizer}, ckpt_path, model)
    train_model = runtime.wrap_ddp(model, rt, args.compile)
    log = runtime.begin(args, rt, step)

    # the starting model's validation loss, for --min-val-drop's check that training moved it (kept in the
    # checkpoint for a resumed run)
    start_val_loss = resume.get("start_val_loss") if resume is not None else \
        eval_loss(model, val_rows, tok, rt, args.chunked_loss) if args.min_val_drop is not None else None
    if start_val_loss is not None:
        runtime.print0(rt, f"starting validation loss {start_val_loss:.4f}")

    def save():
        runtime.save_on_rank0(rt, ckpt_path, runtime.checkpoint(model, tok, step, args, args.stage,
                                                                {"optimizer": optimizer},
                                                                start_val_loss=start_val_loss))

    # ------------------------------------------------------------------ training loop
    loss_value, metrics = None, {}
    bar = tqdm(total=args.steps, initial=step, disable=not rt.is_main, desc=args.stage)
    with runtime.StopOnSignal() as stop:
        while step < args.steps:
            stop.save_and_exit_if_requested(rt, save, ckpt_path, f"step {step}")  # Ctrl-C, SIGTERM
            lr = runtime.set_lr(optimizer, step, args.steps, args)
            idx = data.step_indices(len(train_rows), args.batch_size, step, args.seed, rt.rank, rt.world_size)
            loss_value, grad_norm = runtime.next_token_step(train_model, model, optimizer, [train_rows[i] for i in idx],
                                                            tok.pad_id, micro, rt, args.grad_clip, f"step {step}",
                                                            ckpt_path, args.chunked_loss)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
            metrics = dict(loss=loss_value, lr=lr, grad_norm=grad_norm.item())

            # ---------------------------------------------------------- eval, samples, checkpoint
            if step % args.eval_every == 0 or step == args.steps:
                metrics["val_loss"] = eval_loss(model, val_rows, tok, rt, args.chunked_loss)
                if args.stage == "sft":  # greedy: draws no random number; every rank answers, as --fsdp needs
                    for messages, answer in zip(sample_prompts, model_lib.respond(model, tok, sample_prompts, 40)):
                        runtime.print0(rt, f"  > {messages[-1]['content']}\n    {answer.text}")
                runtime.print0(rt, f"step {step}: loss {loss_value:.4f} val_loss {metrics['val_loss']:.4f}")
            log.log(step, **metrics)
            if step % args.save_every == 0 or step == args.steps:
                save()
    bar.close()
    runtime.cleanup(rt)
    val_loss = metrics.get("val_loss")
    if args.min_val_drop is not None and start_val_loss is not None and val_loss is not None \
            and start_val_loss - val_loss < args.min_val_drop:
        raise runtime.UserError(f"{args.stage} did not move: validation loss {start_val_loss:.4f} -> {val_loss:.4f}, "
                                f"a drop below --min-val-drop {args.min_val_drop}")
    return dict(loss=loss_value, val_loss=val_loss, start_val_loss=start_val_loss, step=step)


if __name__ == "__main__":
    runtime.command(main, get_args)
