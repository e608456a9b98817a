"""Block swap: keep the first K transformer blocks' frozen weights on the GPU and the others in (pinned) host memory,
copying each in just before it runs, the next one prefetched on a side stream (musubi-tuner's `blocks_to_swap`).

At most K + 2 blocks are on the device at once: the resident K, the running block and the one being prefetched.
Training needs gradient checkpointing: a block's forward then saves nothing for backward, so its weights can leave
right after it; in backward each block is recomputed (its weights copied in again, the previous block's prefetched)
and the blocks the backward pass is done with are dropped. The LoRA weights never move (the optimizer holds them).
"""
from __future__ import annotations

import torch


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """Swap the frozen tensors (parameters that do not train, and buffers) of `transformer.transformer_blocks[K:]`
    between `device` and `host` (pinned when `device` is CUDA)."""

    def __init__(self, transformer: torch.nn.Module, resident: int, device: torch.device | str,
                 host: torch.device | str = "cpu"):
        self.blocks = list(transformer.transformer_blocks)
        if not 0 <= resident < len(self.blocks):
            raise ValueError(f"model.blocks_to_swap leaves {resident} blocks on the device; it must leave 0 to "
                             f"{len(self.blocks) - 1} of the {len(self.blocks)}")
        self.transformer = transformer
        self.device, self.host = torch.device(device), torch.device(host)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.swapped = list(range(resident, len(self.blocks)))
        self.frozen = {i: [t for t in (*self.blocks[i].parameters(), *self.blocks[i].buffers())
                           if not t.requires_grad] for i in self.swapped}
        self.host_copies = {i: [self._to_host(t) for t in ts] for i, ts in self.frozen.items()}
        self.loaded: dict[int, torch.cuda.Event | None] = {}
        for i in self.swapped:
            self._drop(i)
        swapped_ids = {id(t) for ts in self.frozen.values() for t in ts}
        for t in (*transformer.parameters(), *transformer.buffers()):    # everything else lives on the device
            if id(t) not in swapped_ids:
                t.data = t.data.to(self.device)
        self.handles = []
        for i in self.swapped:
            self.handles.append(self.blocks[i].register_forward_pre_hook(lambda m, a, i=i: self._before(i)))
            self.handles.append(self.blocks[i].register_forward_hook(lambda m, a, o, i=i: self._after(i)))

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        copy = t.detach().to(self.host, copy=True)
        return copy.pin_memory() if self.cuda else copy

    def _load(self, i: int) -> None:
        """Start copying block i in (on the side stream on CUDA)."""
        if i in self.loaded:
            return
        event = None
        if self.cuda:
            with torch.cuda.stream(self.stream):
                for t, h in zip(self.frozen[i], self.host_copies[i]):
                    t.data = h.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            for t, h in zip(self.frozen[i], self.host_copies[i]):
                t.data = h.to(self.device, copy=True)
        self.loaded[i] = event

    def _drop(self, i: int) -> None:
        for t, h in zip(self.frozen[i], self.host_copies[i]):
            t.data = h
        self.loaded.pop(i, None)

    def _before(self, i: int) -> None:
        backward = _in_backward()
        if not backward and torch.is_grad_enabled() and not self._checkpointing():
            raise ValueError("model.blocks_to_swap needs model.gradient_checkpointing when training: without it a "
                             "block's saved tensors hold its weights until backward")
        neighbour = i - 1 if backward else i + 1
        for j in [j for j in self.loaded if j not in (i, neighbour)]:
            self._drop(j)
        self._load(i)
        event = self.loaded[i]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in self.frozen[i]:
                t.record_stream(torch.cuda.current_stream(self.device))
        if neighbour in self.frozen:
            self._load(neighbour)

    def _after(self, i: int) -> None:
        if not _in_backward():
            self._drop(i)

    def _checkpointing(self) -> bool:
        return bool(getattr(self.transformer, "gradient_checkpointing", False))

    def place_trainable(self) -> None:
        """Move trainable tensors added since (adapters created beside host weights) to the device."""
        for p in self.transformer.parameters():
            if p.requires_grad and p.device != self.device:
                p.data = p.data.to(self.device)

    def on_device(self) -> list[int]:
        """Indices of the swapped blocks whose weights are on the device now."""
        return sorted(self.loaded)

    def remove(self) -> None:
        """Stop swapping: every block back on the device, hooks removed."""
        for h in self.handles:
            h.remove()
        for i in self.swapped:
            self._load(i)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.loaded.clear()
