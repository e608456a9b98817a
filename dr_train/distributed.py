"""The one module that knows about ranks, process groups, devices and DeepSpeed.

`init_distributed` reads the launcher's environment (deepspeed, torchrun: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT), or runs as one process without any. `build_engine` wraps the transformer and the LoRA
optimizer either in a DeepSpeed engine (ZeRO stage 0-3, CPU offload of optimizer states and parameters) or in
a plain torch engine that averages LoRA gradients over ranks itself. Both expose the same small interface
(`forward`, `backward`, `step`, full LoRA weights and optimizer state for checkpoints), so the trainer never asks
which one it has. NCCL on GPUs, gloo on CPUs.

Hybrid mask training under ZeRO: both engines step `dr_train.method.hybrid_mask_training.HMTAdamW`, one parameter
group per adapter, which skips the groups this step does not update (see there for why ZeRO needs it).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from dr_train.method.hybrid_mask_training import HMTAdamW

log = logging.getLogger("dr_train")
BACKENDS = ("auto", "nccl", "gloo")
ENGINES = ("auto", "deepspeed", "torch")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.initialized:
            tdist.barrier()

    def local_rows(self, per_rank: int) -> slice:
        """This rank's rows of a global batch laid out rank after rank, `per_rank` rows each."""
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def gather_flat(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (video ids of the global batch, say)."""
        return [item for part in self.all_gather_objects(items) for item in part]

    def info0(self, message: str, *args) -> None:
        """Log on the main rank only: what a person reads once per launch, not once per rank (nanochat's print0)."""
        if self.is_main:
            log.info(message, *args)

    def warning0(self, message: str, *args) -> None:
        if self.is_main:
            log.warning(message, *args)

    def main_first(self, fn):
        """fn() on the main rank, then, once it is done, on the others: one rank creates what every rank reads."""
        result = fn() if self.is_main else None
        self.barrier()
        if not self.is_main:
            result = fn()
        return result

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Equal-shaped tensors of every rank, concatenated along dim 0 in rank order."""
        if self.world_size == 1:
            return tensor
        comm = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(comm) for _ in range(self.world_size)]
        tdist.all_gather(parts, comm)
        return torch.cat(parts, dim=0).to(tensor.device)

    def all_gather_objects(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        """The mean of a float over ranks."""
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return float(t.item()) / self.world_size

    def check_same(self, value, what: str) -> None:
        """Raise when ranks disagree on `value`, a hashable object (a cheap object all-gather)."""
        values = self.all_gather_objects(value)
        if len(set(values)) > 1:
            raise RuntimeError(f"ranks disagree on {what}: {values}")


def pick_device(name: str, option: str) -> torch.device:
    """The device a single-process job runs on: 'auto' (the current CUDA device when there is one, else the CPU),
    'cpu', 'cuda' or 'cuda:N'; ValueError naming `option` for anything else or for CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{option} must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} is {name!r} but this machine has no CUDA device (use auto or cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{option} is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", use_deepspeed: bool = False, timeout_minutes: int = 30) -> Dist:
    """The process group of this launch (none for one process without a launcher unless DeepSpeed needs one)."""
    if backend not in BACKENDS:
        raise ValueError(f"distributed.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if world_size == 1 and not use_deepspeed:
        return Dist(device=device)
    if tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size(), local_rank, device, tdist.get_backend())
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    name = backend if backend != "auto" else ("nccl" if cuda else "gloo")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if use_deepspeed:
        import deepspeed  # deferred: deepspeed is an optional dependency

        deepspeed.init_distributed(dist_backend=name, timeout=timeout, verbose=False)
    else:
        tdist.init_process_group(name, timeout=timeout)
    return Dist(tdist.get_rank(), tdist.get_world_size(), local_rank, device, name)


def shutdown(dist: Dist) -> None:
    if dist.initialized and tdist.is_initialized():
        tdist.destroy_process_group()


# ---- engines ------------------------------------------------------------------------------------------------
class TorchEngine:
    """Plain torch: loss / accum backward, LoRA gradients averaged over ranks, clipping, AdamW."""

    def __init__(self, module: torch.nn.Module, optimizer: HMTAdamW, grad_accum: int, max_grad_norm: float,
                 dist: Dist, timer=None):
        self.module, self.optimizer, self.dist = module, optimizer, dist
        self.timer = timer
        self.grad_accum, self.max_grad_norm = grad_accum, max_grad_norm
        self.micro = 0
        self.grad_norm: float | None = None

    def forward(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups if g.get("active", True) for p in g["params"]
                if p.grad is not None]

    def step(self) -> bool:
        """Called after every micro-batch; steps the optimizer on the last of each accumulation. True if it did."""
        self.micro += 1
        if self.micro % self.grad_accum:
            return False
        params = self._trainable()
        if self.dist.world_size > 1 and params:
            flat = torch._utils._flatten_dense_tensors([p.grad for p in params])
            with self.timer.phase("comms") if self.timer is not None else contextlib.nullcontext():
                tdist.all_reduce(flat)
            flat /= self.dist.world_size
            for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, [p.grad for p in params])):
                p.grad.copy_(g)
        # the norm is logged also without clipping (an infinite bound scales nothing), as DeepSpeed does
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))) \
            if params else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    # full (unsharded) state, for checkpoints ------------------------------------------------------------
    def gathered(self, params: list[torch.nn.Parameter]):
        return contextlib.nullcontext()

    def link_states(self) -> None:
        """Nothing to link: the optimizer state is keyed by the parameters themselves."""

    def close(self) -> None:
        """Nothing to release."""

    def full_state(self, p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
        value = self.optimizer.state.get(p, {}).get(key)
        return value if value is None or torch.is_tensor(value) else torch.tensor(value)

    def group_step(self, index: int) -> float | None:
        params = self.optimizer.param_groups[index]["params"]
        steps = [self.optimizer.state[p]["step"] for p in params if "step" in self.optimizer.state.get(p, {})]
        return float(steps[0]) if steps else None

    def load_full_state(self, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
        self.optimizer.state[p][key] = value.to(p.device, p.dtype)

    def load_group_step(self, index: int, step: float) -> None:
        for p in self.optimizer.param_groups[index]["params"]:
            self.optimizer.state[p]["step"] = torch.tensor(float(step))


class DeepSpeedEngine:
    """DeepSpeed ZeRO around the transformer; only LoRA parameters are trainable (and in the optimizer)."""

    def __init__(self, module: torch.nn.Module, optimizer: HMTAdamW, config: dict, dist: Dist):
        import deepspeed  # deferred: deepspeed is an optional dependency

        self.dist, self.client = dist, optimizer
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.module = self.engine.module
        self.stage = int(config.get("zero_optimization", {}).get("stage", 0))
        self.grad_norm: float | None = None

    def forward(self, **kwargs):
        return self.engine(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)          # DeepSpeed divides by gradient_accumulation_steps

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = None if norm is None else float(norm)
        return boundary

    def _masters(self) -> list[torch.Tensor]:
        """The fp32 master partition of each parameter group (where the client optimizer keeps its state)."""
        if hasattr(self.optimizer, "fp32_partitioned_groups_flat"):          # ZeRO-3
            return list(self.optimizer.fp32_partitioned_groups_flat)
        if hasattr(self.optimizer, "single_partition_of_fp32_groups"):       # ZeRO-1/2
            return list(self.optimizer.single_partition_of_fp32_groups)
        return []

    def gathered(self, params: list[torch.nn.Parameter]):
        """Full parameters inside the block (ZeRO-3 partitions them; other stages keep them whole)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed  # deferred: deepspeed is an optional dependency

        return deepspeed.zero.GatheredParameters(params)

    def link_states(self) -> None:
        """ZeRO-1/2 link each parameter to its optimizer-state fragment once, after the first step; adapters HMT
        first steps later (and states created by a resume) are linked only by linking again."""
        if hasattr(self.optimizer, "_hp_optimizer_states_linked"):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def close(self) -> None:
        """Remove DeepSpeed's hooks from the module (the backbone is reused for the next relation)."""
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()

    def full_state(self, p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_optimizer_state  # deferred: deepspeed is an optional dependency

        if self.stage == 0:
            return TorchEngine.full_state(self, p, key)
        try:
            value = safe_get_full_optimizer_state(p, key)
        except (KeyError, ValueError):                # no state yet: this adapter was never stepped
            value = None
        return None if value is None else value.reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)

    def group_step(self, index: int) -> float | None:
        if self.stage == 0:
            return TorchEngine.group_step(self, index)
        state = self.client.state.get(self._masters()[index], {})
        return float(state["step"]) if "step" in state else None

    def load_full_state(self, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state  # deferred: deepspeed is an optional dependency

        if self.stage == 0:
            return TorchEngine.load_full_state(self, p, key, value)
        safe_set_full_optimizer_state(p, value.to(self.dist.device, torch.float32), key)

    def load_group_step(self, index: int, step: float) -> None:
        if self.stage == 0:
            return TorchEngine.load_group_step(self, index, step)
        master = self._masters()[index]
        state = self.client.state.setdefault(master, {})
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(master)
            state["exp_avg_sq"] = torch.zeros_like(master)
        state["step"] = torch.tensor(float(step))


def deepspeed_config(zero_stage: int, micro_batch: int, grad_accum: int, max_grad_norm: float,
                     offload_optimizer: bool, offload_params: bool) -> dict:
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        if zero_stage != 3:
            raise ValueError("distributed.offload_params needs distributed.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm, "zero_optimization": zero,
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
    }


def build_engine(module: torch.nn.Module, optimizer: HMTAdamW, dist: Dist, engine: str, zero_stage: int,
                 micro_batch: int, grad_accum: int, max_grad_norm: float, offload_optimizer: bool = False,
                 offload_params: bool = False, timer=None):
    """`timer` (a PhaseTimer) times the plain engine's gradient all-reduce as "comms"; DeepSpeed overlaps its
    collectives with the backward and the step, where they are counted."""
    use_ds = uses_deepspeed(engine, zero_stage, offload_optimizer, offload_params)
    if not use_ds:
        return TorchEngine(module, optimizer, grad_accum, max_grad_norm, dist, timer)
    config = deepspeed_config(zero_stage, micro_batch, grad_accum, max_grad_norm, offload_optimizer,
                              offload_params)
    return DeepSpeedEngine(module, optimizer, config, dist)


def uses_deepspeed(engine: str, zero_stage: int, offload_optimizer: bool, offload_params: bool) -> bool:
    if engine not in ENGINES:
        raise ValueError(f"distributed.engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "torch" and (zero_stage or offload_optimizer or offload_params):
        raise ValueError("ZeRO stages and offload need distributed.engine deepspeed (or auto)")
    return engine == "deepspeed" or (engine == "auto" and bool(zero_stage or offload_optimizer or offload_params))
