"""What every script shares around its algorithm: the command line, the run folder, device and distribution,
optimizer and schedule, guarded steps, checkpoints, resume, interruption and the metrics log.

A training script's main(), in order:
    rt, ckpt_path, resume = start(args, stage)     # the run folder's rules, device, DDP under torchrun, seeds
    ... models and data: every input is read and checked here, before anything is written ...
    step = resume_training(rt, resume, optimizers)
    log = begin(args, rt, step)                     # creates OUT, writes config.json, opens metrics.jsonl
    with StopOnSignal() as stop:                    # Ctrl-C or SIGTERM: checkpoint at this step, then exit
        while step < args.steps:
            stop.save_and_exit_if_requested(rt, save, ckpt_path, f"step {step}")
            ... optimizer_step(...) ... save_on_rank0(rt, ckpt_path, checkpoint(...))
A script runs main through command(main, get_args): bad input (UserError, ValueError, FileNotFoundError) is one
line on stderr and exit status 2 (TRACEBACK=1 shows the traceback instead). Only rank 0 prints and writes files.
"""
import argparse
import functools
import json
import math
import os
import random
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint as recompute_in_backward
from tqdm import tqdm

import data
import model as model_lib
from model import load_checkpoint


# ---------------------------------------------------------------------------------------------- errors
class UserError(Exception):
    """Bad input from the person running a script (a flag, a file, a folder): one line, exit status 2."""


# What a script reports as bad input rather than as a bug: the readers raise ValueError naming file:line.
INPUT_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def command(main, get_args, argv=None):
    """Run main(get_args(argv)) as a command: bad input is one line on stderr and exit status 2, and leaves nothing
    behind (scripts read every input before they write); Ctrl-C outside a training loop exits with status 130 and
    no traceback. TRACEBACK=1 in the environment shows the traceback instead."""
    prog = os.path.basename(sys.argv[0])
    try:
        return main(get_args(argv))
    except INPUT_ERRORS as e:
        if os.environ.get("TRACEBACK"):
            raise
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if os.environ.get("TRACEBACK"):
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


# ---------------------------------------------------------------------------------------------- device, distribution
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True
    ddp: bool = False
    cpu_bf16: bool = False  # --cpu-bf16: bf16 autocast on the CPU too


def pick_device(device="auto"):
    """cuda > mps > cpu for "auto"; a named device this machine lacks is a UserError."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}); "
                        f"use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    return dev


def setup(seed, device="auto", seed_per_rank=False):
    """Runtime for this process. Every rank gets the same seed (identical model init) unless seed_per_rank,
    which adds the rank (different samples per rank, e.g. for rollouts)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    ddp = world_size > 1
    dev = pick_device(device)
    if ddp:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        elif dev.type != "cpu":
            raise UserError(f"data-parallel runs need cuda or cpu, not {dev.type}; pass --device cpu")
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    seed = seed + rank if seed_per_rank else seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds cuda too
    return Runtime(dev, rank, world_size, local_rank, rank == 0, ddp)


def autocast(rt):
    """bf16 autocast on CUDA, and on the CPU under --cpu-bf16 (weights, optimizer and the output head stay
    float32); a no-op elsewhere."""
    if rt.device.type == "cuda" or (rt.device.type == "cpu" and rt.cpu_bf16):
        return torch.autocast(rt.device.type, dtype=torch.bfloat16)
    return nullcontext()


def wrap_ddp(model, rt, compile=False):
    """The model (torch.compiled when asked) wrapped for gradient averaging across ranks; the model itself on a
    single process, or when --fsdp already sharded it (FSDP averages the gradients itself)."""
    model = torch.compile(model) if compile else model
    if not rt.ddp or sharded(model):
        return model
    return DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)


def no_sync(model, last):
    """Skip DDP's gradient all-reduce on every micro-batch but the last of an accumulation step. A model sharded by
    --fsdp reduce-scatters every micro-batch: skipping it would hold whole unsharded gradients between micro-batches,
    the memory FSDP is there to save."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()


def all_reduce_sum(x, rt):
    """Sum of tensor x over ranks (x itself on a single process)."""
    if rt.ddp:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def sum_over_ranks(rt):
    """all_reduce_sum as a function of the tensor alone: the `total` that train_ppo's masked means, whitening and
    explained variance take, so that a mean over this rank's share of a batch is the whole batch's."""
    return functools.partial(all_reduce_sum, rt=rt)


def shard(items, rt):
    """This rank's share of a list of work (prompts to answer, examples to evaluate): every world_size-th item,
    starting at its rank."""
    return items[rt.rank::rt.world_size]


def gather_shards(part, rt):
    """The inverse of shard: every rank's results, one per item of its share, back in the order of the items (the
    list itself on a single process). Nothing is duplicated or dropped whatever the number of ranks."""
    if not rt.ddp:
        return list(part)
    parts = [None] * rt.world_size
    dist.all_gather_object(parts, list(part))
    return [parts[r][j] for j in range(len(parts[0])) for r in range(rt.world_size) if j < len(parts[r])]


def row_generators(seed, rows, device):
    """One random generator per sampled row, seeded by (seed, the row's number in the global batch): a row draws the
    same numbers whichever rank samples it and whatever rows share its batch, so N ranks sample what one process
    samples (model.sample_next takes the list)."""
    return [torch.Generator(device=device).manual_seed((seed * 1_000_003 + row) % 2**63) for row in rows]


def cleanup(rt):
    """Leave the process group together: the barrier keeps a rank from tearing down its gloo threads while another
    still saves or samples (a rank that did so could abort at exit with "terminate called without an active
    exception")."""
    if rt.ddp and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(rt, *message):
    """Print on rank 0 only, without breaking a tqdm bar."""
    if rt.is_main:
        tqdm.write(" ".join(str(m) for m in message))


# ---------------------------------------------------------------------------------------------- sharding (FSDP)
def sharded(model):
    """Whether --fsdp sharded model: fully_shard makes it an FSDPModule (FSDP is imported only by distribute, as its
    import adds half a second to every start)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def distribute(model, rt, fsdp=False, activation_checkpointing=False):
    """Apply --activation-checkpointing and --fsdp to a model before its optimizer is built; returns the model.

    Activation checkpointing keeps only each block's input in the forward pass and recomputes the block inside the
    backward pass (torch.utils.checkpoint): activation memory of one block instead of all, for one more forward.
    FSDP (PyTorch's FSDP2, fully_shard) splits every parameter, its gradient and its AdamW moments over the ranks:
    each TransformerBlock is one unit, gathered whole just before its forward and backward and freed after; the
    root unit holds the rest (embeddings, final norm, head). A tied head is the embedding's own parameter and both
    sit in the root unit, so it stays one parameter. On CUDA the gathered weights compute in bf16 and gradients are
    reduced in float32; the sharded weights and the optimizer stay float32. Every rank must then run the same
    forward passes (each one gathers weights from all ranks). docs/memory.md: what each lets fit."""
    if activation_checkpointing:
        for block in model.layers:
            # the block's forward under checkpoint; FSDP's gather hooks, set below, stay outside it
            block.forward = functools.partial(recompute_in_backward, block.forward, use_reentrant=False)
    if not fsdp:
        return model
    if not rt.ddp:
        raise UserError("--fsdp shards a model over the processes of a torchrun launch; this is a single process")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    policy = bf16 if rt.device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model):
    """model.state_dict(); for a sharded model the whole state gathered to rank 0's CPU (every rank must call it;
    the others get {}), so that a checkpoint is the same single file whether or not the run was sharded."""
    if not sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_full_state_options())


def _parameter_names(model, optimizer):
    """The name in model of each parameter of optimizer, in the optimizer's order (its state dict numbers them so)."""
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model, optimizer):
    """optimizer.state_dict(); for a sharded model's optimizer the whole state, gathered to rank 0's CPU (every rank
    must call it; the others get {}) and numbered as optimizer.state_dict() numbers it, not by parameter name."""
    if not sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    full = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    if not full:
        return {}
    names = _parameter_names(model, optimizer)
    return dict(state={i: full["state"][name] for i, name in enumerate(names) if name in full["state"]},
                param_groups=optimizer.state_dict()["param_groups"])


def load_optimizer_state(model, optimizer, state):
    """optimizer.load_state_dict(state) of a checkpoint's whole state; for a sharded model each rank keeps its
    own shard of every moment (set_optimizer_state_dict)."""
    if not sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = _parameter_names(model, optimizer)
    by_name = dict(state={names[i]: s for i, s in state["state"].items()},
                   param_groups=[dict(group, params=[names[i] for i in group["params"]])
                                 for group in state["param_groups"]])
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------------------------------- optimisation
def freeze_lower(model, n_layers):
    """Freeze the token embedding and the lowest n_layers blocks (requires_grad False); 0 freezes nothing.

    Backward then stops at block n_layers: the frozen trunk runs forward only and keeps no activations, which is
    what makes a few hundred steps of a 135M-parameter model fit a CPU. A tied output head is the embedding and
    freezes with it."""
    model = getattr(model, "module", model)
    if n_layers == 0:
        return model
    if n_layers > len(model.layers):
        raise UserError(f"--freeze-layers {n_layers}: the model has {len(model.layers)} blocks")
    for p in [*model.tok_embeddings.parameters(), *model.layers[:n_layers].parameters()]:
        p.requires_grad_(False)
    return model


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), freeze=0):
    """AdamW with decay on matrices only (not on norm gains or biases). Llama 2, section 2.2: beta1 0.9,
    beta2 0.95, eps 1e-5, weight decay 0.1. freeze > 0 first freezes the embedding and that many lowest blocks
    (freeze_lower); frozen parameters are left out."""
    freeze_lower(model, freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-5, fused=on_cuda or None)


def cosine_lr(step, total_steps, lr, warmup_steps, min_lr_ratio=0.1):
    """Learning rate at step (0-based): linear warm-up to lr over warmup_steps (step 0 already gets
    lr / warmup_steps), then cosine decay to lr * min_lr_ratio at total_steps (Llama 2 decays to 10%)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    min_lr = lr * min_lr_ratio
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, step, total_steps, args):
    """Set and return the cosine schedule's learning rate at `step` of `total_steps` (from args: lr, warmup,
    min_lr_ratio)."""
    lr = cosine_lr(step, total_steps, args.lr, args.warmup, args.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(models, optimizers, loss_value, grad_clip, where, ckpt_path):
    """One guarded update: stop, naming the last good checkpoint, when the loss or a gradient norm is not finite
    (a NaN never reaches the weights); else clip each model's gradient norm, step and zero the gradients.
    models and optimizers are one each or equal-length lists (PPO steps its policy and value model together);
    `where` names the step in the message ("step 12"). Returns the gradient norm(s) before clipping."""
    single = not isinstance(models, (list, tuple))
    models, optimizers = ([models], [optimizers]) if single else (models, optimizers)
    if not math.isfinite(loss_value):
        raise SystemExit(f"loss became {loss_value} at {where}; the last good checkpoint is {ckpt_path}")
    norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), grad_clip) for m in models]
    # a sharded model's norm is a DTensor: the whole tensor's norm, the same on every rank
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    if not all(torch.isfinite(n) for n in norms):  # e.g. an overflow in the backward pass
        shown = ", ".join(str(n.item()) for n in norms)
        raise SystemExit(f"gradient norm became {shown} at {where}; the last good checkpoint is {ckpt_path}")
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return norms[0] if single else norms


# ---------------------------------------------------------------------------------------------- next-token steps
def next_token_step(train_model, model, optimizer, rows, pad_id, micro, rt, grad_clip, where, ckpt_path,
                    chunked=False):
    """One optimizer step of model.next_token_loss (SFT: answer tokens only, Llama 2 section 3.1) on this rank's rows
    [(ids, loss_mask)], in micro-batches of `micro` rows, DDP syncing the gradient on the last. Returns the global
    batch's mean loss and the gradient norm. chunked: the loss through model.chunked_nll (--chunked-loss)."""
    batches = [{k: v.to(rt.device) for k, v in data.collate([r[0] for r in rows[j:j + micro]], pad_id,
                                                             [r[1] for r in rows[j:j + micro]]).items()}
               for j in range(0, len(rows), micro)]
    n_tokens = all_reduce_sum(sum((b["loss_mask"][:, 1:] * b["attention_mask"][:, 1:]).sum()
                                  for b in batches).float(), rt)
    loss_sum = 0.0
    for j, batch in enumerate(batches):
        with no_sync(train_model, last=j == len(batches) - 1):
            with autocast(rt):
                loss = model_lib.next_token_loss(train_model, batch["tokens"], batch["attention_mask"],
                                                 batch["loss_mask"], n_tokens, rt.world_size, chunked)
            loss.backward()
        loss_sum += loss.item() / rt.world_size
    loss_value = all_reduce_sum(torch.tensor(loss_sum, device=rt.device), rt).item()
    return loss_value, optimizer_step(model, optimizer, loss_value, grad_clip, where, ckpt_path)


def micro_batch_size(batch_size, grad_accum, rt):
    """Rows per micro-batch on this rank; a batch that does not split evenly is a UserError."""
    if batch_size % (grad_accum * rt.world_size):
        raise UserError(f"--batch-size {batch_size} does not split into --grad-accum {grad_accum} micro-batches on "
                        f"{rt.world_size} process(es)")
    return batch_size // grad_accum // rt.world_size


# ---------------------------------------------------------------------------------------------- command line
class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser(doc):
    """The parser of a script whose module docstring is `doc`: its first line describes the script, the rest is
    the epilog of --help."""
    return Parser(description=doc.split("\n")[0], epilog=doc.split("\n", 1)[1],
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def _parse_number(kind, low, strict, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
    return value


def positive_int(text):
    return _parse_number(int, 0, True, text)


def nonnegative_int(text):
    return _parse_number(int, 0, False, text)


def positive_float(text):
    return _parse_number(float, 0.0, True, text)


def nonnegative_float(text):
    return _parse_number(float, 0.0, False, text)


def add_run_arguments(p, outputs, seed_help="random seed"):
    """--out, --resume, --overwrite, --seed, --device and --compile: the flags every training script has."""
    p.add_argument("--out", required=True, help=f"output folder ({outputs})")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its model.pt (step, "
                   "optimizer and RNG states); an error when OUT holds nothing to resume")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT (without it or "
                   "--resume, a folder that holds a run is an error)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained model(s)")
    p.add_argument("--cpu-bf16", action="store_true", help="on the CPU, compute the training steps' matrix products "
                   "in bf16 under autocast as CUDA always does (weights, optimizer and the output head stay float32): "
                   "about half the step time on a CPU with AVX512-BF16 or AMX (docs/smollm2.md), slower on one without")
    p.add_argument("--freeze-layers", type=nonnegative_int, default=0, help="freeze the token embedding and this "
                   "many lowest blocks of the trained model(s) (0: train everything); a CPU budget for real models")


def add_sharding_arguments(p):
    """--fsdp and --activation-checkpointing, for the stages whose every forward pass runs on every rank alike
    (train_sft, train_rm, train_dpo); runtime.distribute applies them."""
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the trained model's weights, gradients "
                   "and optimizer state over the ranks (PyTorch FSDP2, one unit per transformer block) instead of "
                   "a full copy per rank; bf16 compute on CUDA; checkpoints stay single files (docs/memory.md)")
    p.add_argument("--activation-checkpointing", action="store_true", help="keep only each block's input in the "
                   "forward pass and recompute the block in the backward pass: less activation memory for about "
                   "one more forward pass of compute (docs/memory.md)")


def add_chunked_loss_argument(p):
    """--chunked-loss, for the stages trained with the next-token loss (train_sft, distill)."""
    p.add_argument("--chunked-loss", action="store_true", help="compute the next-token loss and its gradient block "
                   "by block without the whole (batch, length, vocabulary) logits (model.chunked_nll): the same loss "
                   "up to rounding, less memory, a faster step; a speed option Llama 2 does not describe")


def _show_defaults(parser, presets):
    """Append each flag's default to its help: its value, or its value under each preset that sets it."""
    for action in parser._actions:
        if not action.option_strings or not action.help or action.help == argparse.SUPPRESS \
                or action.dest == "help" or "(default" in action.help:
            continue
        per_preset = [f"{name} {preset[action.dest]}" for name, preset in presets.items() if action.dest in preset]
        if per_preset:
            action.help += f" (default by --preset: {', '.join(per_preset)})"
        elif action.required:
            action.help += " (required)"
        elif isinstance(action, argparse._StoreTrueAction):
            action.help += " (default: off)"
        else:
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            action.help += f" (default: {'none' if shown is None else shown if shown != '' else 'empty'})"


def parse_args(parser, presets, argv=None):
    """Parse argv where --preset NAME sets defaults and flags given explicitly win.

    A preset is a dict keyed by argparse dest names (n_kv_heads, not --n-kv-heads); keys that are no flag still
    become attributes of the result (e.g. steps_base). If the parser has no --preset, one is added, defaulting
    to no preset (tools without presets pass {}). --help shows every flag's default, per preset where a preset sets it.
    """
    if presets and "preset" not in {a.dest for a in parser._actions}:
        parser.add_argument("--preset", choices=sorted(presets), default=None, help="named set of defaults")
    _show_defaults(parser, presets)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default=parser.get_default("preset"))
    name = first.parse_known_args(argv)[0].preset
    if name is not None:
        if name not in presets:
            parser.error(f"unknown preset {name!r}; choose from {sorted(presets)}")
        parser.set_defaults(**presets[name])
    return parser.parse_args(argv)


def save_config(args, rt, path=None):
    """Write the resolved arguments as JSON (default: args.out/config.json), rank 0 only."""
    if rt.is_main:
        path = path or os.path.join(args.out, "config.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(vars(args), f, indent=1, default=str)


class MetricsLog:
    """Appends one JSON object per log() call to path, flushed at once so a killed run keeps its history.

    resume_step: a resumed run first drops the rows logged after its checkpoint's step (a run killed between two
    checkpoints logged steps it now repeats), so no step appears twice.
    """

    def __init__(self, path, enabled=True, resume_step=None):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if resume_step is not None and os.path.exists(path):
                with open(path) as f:
                    rows = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
                with open(path, "w") as f:
                    f.writelines(rows)

    def log(self, step, **metrics):
        if not self.enabled:
            return
        row = {"step": step, **{k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()


# ---------------------------------------------------------------------------------------------- a training run
# The files a training run writes in its folder: a folder holding any of them holds a run.
RUN_FILES = ("model.pt", "config.json", "metrics.jsonl", "samples.jsonl", "eval.json", "histograms.json",
             "best_of_k.json")


def writable(folder):
    """Whether folder can be written (or created): its nearest existing ancestor is a writable folder."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def start(args, stage=None):
    """The opening of every training script, before anything is written: the run folder's rules, then runtime
    setup. --resume needs OUT/model.pt (written by `stage`, when given); without --resume a folder that holds a run
    is an error unless --overwrite. Returns (rt, ckpt_path, the checkpoint to resume or None)."""
    ckpt_path = os.path.join(args.out, "model.pt")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file, not a folder")
    if not writable(args.out):
        raise UserError(f"--out {args.out}: cannot write there (permission denied)")
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    if args.resume and not os.path.exists(ckpt_path):
        raise UserError(f"--resume: nothing to resume, {args.out} holds no model.pt")
    if held and not args.resume and not args.overwrite:
        raise UserError(f"{args.out} already holds a run ({', '.join(held)}); pass --resume to continue it or "
                        f"--overwrite to replace it")
    rt = setup(args.seed, args.device)
    rt.cpu_bf16 = args.cpu_bf16
    resume = load_checkpoint(ckpt_path) if args.resume else None
    if resume is not None and stage is not None and resume.get("stage") != stage:
        raise UserError(f"{ckpt_path} holds a {resume.get('stage')!r} checkpoint, not a {stage!r} one; --resume "
                        f"continues a run of the same stage (or use another --out)")
    return rt, ckpt_path, resume


def resume_training(rt, resume, optimizers, ckpt_path=None, model=None):
    """Continue a resumed run: each optimizer's state (optimizers: {checkpoint key: optimizer}; model, the model
    they train, when --fsdp may have sharded it) and every RNG state; returns its step (0 for a fresh run)."""
    if resume is None:
        return 0
    for name, opt in optimizers.items():
        load_optimizer_state(model, opt, resume[name])
    set_rng_state(resume["rng"])
    print0(rt, f"resumed from {ckpt_path or 'its checkpoint'} at step {resume['step']}")
    return resume["step"]


def begin(args, rt, step, *logs):
    """Open the run folder once every input has been read: --overwrite first removes the old run's files, then
    config.json is written. Returns a MetricsLog for each name in logs (default: metrics.jsonl), each cut back
    to `step` on --resume."""
    if rt.is_main and args.overwrite and not args.resume:
        for name in RUN_FILES:
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    save_config(args, rt)
    opened = [MetricsLog(os.path.join(args.out, name), rt.is_main, step if args.resume else None)
              for name in logs or ("metrics.jsonl",)]
    return opened[0] if len(opened) == 1 else opened


def checkpoint(model, tok, step, args, stage, optimizers, **extra):
    """The dict a training script saves: weights, architecture, tokenizer, step, each optimizer's state under its
    key, every RNG state, the arguments and the stage that wrote it, plus what the stage adds. Every rank calls it:
    a model sharded by --fsdp is gathered whole (model_state, optimizer_state)."""
    return dict(model=model_state(model), model_config=vars(model.config), tokenizer=tok.to_dict(), step=step,
                **{name: optimizer_state(model, opt) for name, opt in optimizers.items()}, rng=rng_state(),
                args=vars(args), stage=stage, **extra)


def save_on_rank0(rt, path, state):
    """model.save_checkpoint on rank 0 only (atomic: a temporary file, then a rename)."""
    if rt.is_main:
        model_lib.save_checkpoint(path, state)


class StopOnSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM only set a flag: the training loop checks it between steps,
    saves a checkpoint at the step it reached and exits with status 128 + the signal's number, so that --resume
    continues with no step lost. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signum, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def requested(self, rt):
        """Whether this or any other rank was signalled (all ranks must stop at the same step)."""
        flag = float(self.signum or 0)
        if rt.ddp:
            flag = all_reduce_max(flag, rt)
            self.signum = self.signum or int(flag) or None
        return flag > 0

    def save_and_exit_if_requested(self, rt, save, ckpt_path, where):
        """At the top of a training loop's iteration: when a signal came, save() the checkpoint of the steps done
        and exit; else return at once."""
        if self.requested(rt):
            save()
            self.exit(rt, ckpt_path, where)

    def exit(self, rt, ckpt_path, where):
        """After the checkpoint is saved: say where the run stopped and how to go on, then exit."""
        print0(rt, f"{signal.Signals(self.signum).name} at {where}: saved {ckpt_path}; continue with --resume")
        cleanup(rt)
        raise SystemExit(128 + self.signum)


def all_reduce_max(value, rt):
    x = torch.tensor(value, device=rt.device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.item()


# ---------------------------------------------------------------------------------------------- RNG state
def rng_state():
    """Every generator's state, in plain types and tensors, for checkpoints (resume continues the streams)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=random.getstate(), numpy=(name, keys.tolist(), pos, has_gauss, cached),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # tuples, even if the state went through JSON
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
