"""Peak allocated tensor bytes of one training step or one generation batch, phase by phase (used by
``memory_calibration.py`` and ``gpu_check.py``).

On CPU: the bytes alive when the step starts, counted from the objects (parameters, buffers, quantization state,
optimizer state, the batch), plus the peak of torch's own allocation records during each phase (the profiler's
``profile_memory`` events, replayed in time order). On CUDA: ``torch.cuda.max_memory_allocated()``, read and reset
where each phase starts.
"""

from __future__ import annotations

import gc
import time


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def model_tensors(model):
    """Parameters, buffers and bitsandbytes quantization state of ``model``."""
    for tensor in [*model.parameters(), *model.buffers()]:
        yield tensor
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            yield state.absmax
            yield state.code
            if getattr(state, "nested", False):
                yield state.offset
                yield state.state2.absmax
                yield state.state2.code
        scale = getattr(tensor, "SCB", None)
        if scale is not None:
            yield scale


def optimizer_tensors(optimizer):
    if optimizer is None:
        return
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "untyped_storage"):
                yield value


def batch_tensors(batch: dict):
    return [v for v in batch.values() if hasattr(v, "untyped_storage")]


class PeakMeter:
    """Peak allocated tensor bytes inside the block, overall and per phase (``mark(name)`` starts a phase):
    ``torch.cuda.max_memory_allocated`` on CUDA (read and reset at each mark); on CPU the bytes alive at the start
    (``static``, counted from the objects) plus the peak of the profiler's allocation records, replayed in time
    order and split at the marks (profiler ranges named ``surgvqa.phase.<name>``)."""

    PREFIX = "surgvqa.phase."

    def __init__(self, device: str, static: int = 0, first_phase: str = "step"):
        self.device = device
        self.static = static
        self.peak = 0
        self.phases: dict[str, int] = {}
        self._phase = first_phase

    def mark(self, name: str) -> None:
        import torch

        if self.device == "cpu":
            with torch.profiler.record_function(self.PREFIX + name):
                pass
        else:
            self.phases[self._phase] = max(self.phases.get(self._phase, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            self._phase = name

    def __enter__(self):
        import torch

        gc.collect()
        if self.device == "cpu":
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        else:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cpu":
            self._profile.__exit__(*exc)
            events = self._profile.profiler.kineto_results.events()
            allocations = sorted((e.start_ns(), e.nbytes()) for e in events
                                 if e.name() == "[memory]" and e.device_type().name == "CPU")
            marks = sorted((e.start_ns(), e.name().removeprefix(self.PREFIX)) for e in events
                           if e.name().startswith(self.PREFIX))
            current, phase, next_mark = 0, self._phase, 0
            self.phases = {phase: 0}
            for start, nbytes in allocations:
                while next_mark < len(marks) and marks[next_mark][0] <= start:
                    phase = marks[next_mark][1]
                    self.phases.setdefault(phase, current)  # a phase starts with what is alive
                    next_mark += 1
                current += nbytes
                self.phases[phase] = max(self.phases[phase], current)
            for _, name in marks[next_mark:]:
                self.phases.setdefault(name, current)
            self.phases = {name: self.static + top for name, top in self.phases.items()}
        else:
            torch.cuda.synchronize()
            self.phases[self._phase] = max(self.phases.get(self._phase, 0), torch.cuda.max_memory_allocated())
        self.peak = max(self.phases.values())
        return False


class PhaseMarks:
    """Marks the phases of a training step on ``meter``: ``head`` when the LM head's input is computed (the
    decoder layers are done), ``backward`` when its gradient is (the LM head and the loss are done backwards)."""

    def __init__(self, model, meter: PeakMeter):
        self.meter = meter
        self.handle = model.get_output_embeddings().register_forward_pre_hook(self._head_starts)

    def _head_starts(self, module, args) -> None:
        self.meter.mark("head")
        hidden = args[0]
        if hidden.requires_grad:
            hidden.register_hook(self._backward_starts)

    def _backward_starts(self, grad) -> None:
        self.meter.mark("backward")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def to_device(batch: dict, device: str) -> dict:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def train_step(model, optimizer, batch: dict, autocast_dtype, device: str) -> float:
    """One optimizer step as the Trainer takes it (autocast forward, backward, step, zero_grad to None)."""
    import torch

    start = time.perf_counter()
    inputs = to_device(batch, device)
    with torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del inputs, loss
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def generate_step(model, tokenizer, batch: dict, max_new_tokens: int, device: str) -> float:
    """One generation batch as ``surgvqa.generate.generate_batch`` runs it, forced to ``max_new_tokens``."""
    import torch

    from surgvqa.generate import _to_device, eos_token_ids

    batch = {k: v for k, v in batch.items() if k not in ("keys", "labels")}
    start = time.perf_counter()
    with torch.inference_mode():
        inputs = _to_device(batch, torch.device(device), getattr(model, "dtype", None))
        model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                       eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
        del inputs
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start
