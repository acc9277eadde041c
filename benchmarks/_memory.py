"""Peak CPU tensor memory of a callable, shared by the benchmark scripts (not part of the medcl package)."""

from __future__ import annotations

from collections.abc import Callable


def profiled_peak_mb(fn: Callable[[], None]) -> float:
    """Peak of the CPU tensor memory allocated (net of frees) while ``fn`` runs, in MB.

    Read from ``torch.profiler``'s allocation timeline (every allocation and free of the CPU allocator,
    forward and backward): exact and blind to allocator caching, unlike process RSS.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    cur = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    return peak / 2**20
