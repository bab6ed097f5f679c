"""The encode engine: from validated images to work recorded in a command buffer.

Every kernel (forward, transposed, binary, neuron, and the gradient kernels) reaches the backends and
the memory budget through one ``Encoder``, which each kernel owns and replaces when its weights or
descriptor change (``MPSKernel._drop_caches``). For an encode whose arguments the kernel has
validated, it

1. refuses images that could not be allocated (``memory``),
2. plans: the kernel resolves its ``ConvProblem`` and dispatch picks a backend and its plan, once
   per distinct configuration (the plan cache),
3. fits: a problem whose scratch memory would not fit runs as tiles that do (``memory.split``),
4. records one ``_Work`` per problem or tile: the backend's bound views of the images' storages and
   the kernel's parameters in the backend's layout (both cached), run at ``commit``,
5. remembers a plain single encode, so that encoding the same images with the same settings again
   (the steady state of a network) records the same work without steps 1-4 (``repeat``).

What the engine asks of a kernel: ``_device``, ``_resolve(source, destination, owner)`` (the
``ConvProblem``, or an error naming what is wrong), ``_settings()`` (every property an encode reads
that can change without dropping the caches), ``_params()`` (weights as ``KeptWeights`` or a binary
kernel's ``BinaryParams``, bias and PReLU coefficients as float32 arrays), ``label`` and
``_options``. Of an image: its ``_layout``, its storage (``_storage``, ``_ensure_storage()``) and
``_consume_read()``.
"""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch

from . import backends, config, memory
from .backends import onnx
from .core.formats import MPSImageFeatureChannelFormat as F, storage_to_values, values_to_storage
from .core.geometry import ConvProblem
from .core.weights import KeptWeights
from .image import MPSTemporaryImage, unallocated
from .types import MPSKernelOptions


class Planned(NamedTuple):
    """One resolved configuration: the problem, the backend that runs it, the backend's plan (None for
    an empty problem) and the scratch bytes a run takes."""

    problem: ConvProblem
    backend: object
    plan: object
    scratch: int


class GradientJob(NamedTuple):
    """One gradient encode, validated by its kernel: the forward ``problem`` (as the gradient state
    recorded it), the incoming gradient image and its first channel, the forward source, the
    destination of ``dL/dS`` (None when not asked for), and the float32 views the weight and bias
    gradients go into (None when not asked for; ``accumulate``: add to them, as later images of a
    batch sharing one state do)."""

    problem: ConvProblem
    gradient: object
    gradient_channel0: int
    source: object
    destination: object
    weight_gradient: object
    bias_gradient: object
    accumulate: bool


class NeuronGradientJob(NamedTuple):
    """One neuron gradient encode, validated by its kernel: the forward neuron's ``problem`` as its
    gradient state recorded it (``dst_format`` / ``dst_channel0``: the destination of ``dL/dS``), the
    incoming gradient image and its first channel, the forward source and the destination."""

    problem: ConvProblem
    gradient: object
    gradient_channel0: int
    source: object
    destination: object


class _Repeat(NamedTuple):
    """A validated encode kept for ``repeat``: its images and their storages when it ran, the kernel's
    ``_settings()`` then, its scratch bytes, and what it recorded (a ``_Work``, None for an empty
    problem)."""

    source: object
    destination: object
    src_storage: object
    dst_storage: object
    settings: tuple
    scratch: int
    work: _Work | None


#: Entries a cache keeps before it starts again (a kernel encoding ever new shapes stays bounded).
PLANS, BOUND, REPEATS = 64, 8, 8


#: How many times more scratch than the reference's a backend may need before the reference runs the
#: problem instead (only from ``memory.SMALL`` bytes of scratch up).
SPARSE_FACTOR = 16


class Encoder:
    """The encode engine of one kernel: its plan, prepared-weights, bound-view and repeat caches.

    The caches hold only what resolving again would give: plans are keyed by the images' layouts and
    the kernel's settings, bound views by the plan and the storages (each entry keeps its storages, so
    that their ids are not reused meanwhile), prepared weights by backend and source format; the
    kernel drops the whole engine when its weights or descriptor change.
    """

    __slots__ = ("plans", "prepared_weights", "bound", "repeats")

    def __init__(self):
        self.plans: dict = {}
        self.prepared_weights: dict = {}
        self.bound: dict = {}
        self.repeats: dict = {}

    def __reduce__(self):
        # A copied kernel (copy.deepcopy, pickle) starts with an empty engine, as ``copy()`` does: the
        # caches hold backend objects (oneDNN's weights, CUDA graphs, compiled launches) that cannot
        # be copied, and resolving again gives the same.
        return Encoder, ()

    # -- planning
    def plan(self, kernel, source, destination, owner: str) -> Planned:
        """The ``Planned`` encode of ``source`` into ``destination``, resolved once per configuration.

        The key holds everything ``_resolve`` and dispatch read apart from the kernel's weights and
        descriptor (whose changes replace the engine); so a hit is exactly what resolving again
        would give. Only successful resolutions are cached."""
        key = (source._layout, destination._layout, kernel._settings())
        entry = self.plans.get(key)
        if entry is None:
            problem = kernel._resolve(source, destination, owner)
            backend, plan = backends.choose(problem, kernel._device)
            scratch = 0 if problem.empty else backend.scratch_bytes(problem)
            if scratch > memory.SMALL and config.backend() == "auto":
                # windows far apart (a huge stride or dilation on a small image): the fast backends
                # work on the span the taps cover, the reference gathers only the taps themselves
                reference = backends.REGISTRY["reference"]
                if reference.scratch_bytes(problem) * SPARSE_FACTOR < scratch:
                    backend, plan = reference, backends.plan(reference, problem, kernel._device)
                    scratch = reference.scratch_bytes(problem)
            entry = Planned(problem, backend, plan, scratch)
            self._put(self.plans, key, entry, PLANS)
        return entry

    def gradient_plan(self, problem: ConvProblem, device) -> Planned:
        """The ``Planned`` gradient of the forward ``problem``: the backend dispatch picks for gradients."""
        key = ("gradient", problem, config.backend())
        entry = self.plans.get(key)
        if entry is None:
            backend = backends.select(problem, device, gradient=True)
            entry = Planned(problem, backend, backend.plan(problem, device), backend.gradient_scratch_bytes(problem))
            self._put(self.plans, key, entry, PLANS)
        return entry

    def prepared(self, kernel, backend, src_format: int):
        """The kernel's parameters in ``backend``'s layout for sources of ``src_format``: bfloat16
        sources take bfloat16-rounded weights (``KeptWeights.for_source``)."""
        key = (backend.name, src_format == F.bfloat16)
        prepared = self.prepared_weights.get(key)
        if prepared is None:
            weights, *rest = kernel._params()
            if isinstance(weights, KeptWeights):
                weights = weights.for_source(src_format)
            prepared = self.prepared_weights[key] = backend.prepare(weights, *rest, kernel._device)
        return prepared

    def _bind(self, planned: Planned, source, destination):
        """The backend's views of two storages; reused while the kernel encodes the same images. Not
        kept for temporary images: their storage is new in every command buffer, and a kept entry
        would hold the memory of a finished one."""
        src, dst = source._ensure_storage(), destination._ensure_storage()
        if isinstance(source, MPSTemporaryImage) or isinstance(destination, MPSTemporaryImage):
            return planned.backend.bind(planned.plan, src, dst)
        key = (id(planned.plan), id(src), id(dst))
        entry = self.bound.get(key)
        if entry is None or entry[0] is not planned.plan:
            entry = (planned.plan, planned.backend.bind(planned.plan, src, dst), src, dst)
            self._put(self.bound, key, entry, BOUND)
        return entry[1]

    @staticmethod
    def _put(cache: dict, key, value, most: int) -> None:
        if len(cache) >= most:
            cache.clear()
        cache[key] = value

    # -- forward encodes
    def encode(self, kernel, cb, pairs: list, owner: str) -> list[Planned]:
        """Plan, fit and record validated ``(source, destination)`` pairs (nothing is recorded if any
        is refused), then consume one read of each distinct temporary source."""
        device = kernel._device
        new = _new_bytes(image for pair in pairs for image in pair)
        if new:  # images that cannot exist are refused before planning (on CUDA, planning may autotune)
            memory.check(owner, device, new, 0, memory.available(device, new, 0))
        planned = [self.plan(kernel, source, destination, owner) for source, destination in pairs]
        pieces = self._fit(planned, device, owner, new)
        for item, (source, destination), tiles in zip(planned, pairs, pieces):
            if item.problem.empty:
                continue
            prepared = self.prepared(kernel, item.backend, item.problem.src_format)
            if tiles is None:
                cb._record(_Work(item.backend, self._bind(item, source, destination), prepared, kernel,
                                 step=_step(kernel, item.problem, source, destination)))
                continue
            src, dst = source._ensure_storage(), destination._ensure_storage()
            for backend, plan in tiles:
                cb._record(_Work(backend, backend.bind(plan, src, dst), prepared, kernel))
        _consume_reads(source for source, _ in pairs)
        if len(pairs) == 1:
            self._remember(kernel, planned[0], *pairs[0], pieces[0])
        return planned

    def _fit(self, planned: list[Planned], device, owner: str, new: int) -> list:
        """Per item, None (run it whole) or its tiles' ``(backend, plan)``: the tiles that keep the
        scratch memory under the budget. Raises ``MPSMemoryError`` when the ``new`` bytes of storage
        the encode allocates plus its largest scratch would not fit."""
        available = memory.available(device, new, max(item.scratch for item in planned))
        if available is None:
            return [None] * len(planned)
        budget, pieces, peak = memory.tile_budget(device, available), [], 0
        for item in planned:
            if item.scratch <= budget:
                pieces.append(None)
                peak = max(peak, item.scratch)
                continue
            parts = memory.split(item.problem, item.backend, budget)
            peak = max(peak, *(item.backend.scratch_bytes(part) for part in parts))
            pieces.append([(item.backend, backends.plan(item.backend, part, device)) for part in parts])
        memory.check(owner, device, new, peak, available)
        return pieces

    def _remember(self, kernel, item: Planned, source, destination, tiles) -> None:
        """Keep what this validated encode recorded, for ``repeat``: when it ran whole, of plain images
        with storage (a temporary image's read count and command buffer are checked on every encode,
        and allocating storage is checked against the memory there is). A few (source, destination)
        pairs are kept, so that a kernel that alternates between images (ping-pong buffers) repeats
        too; each entry holds its images, so that their ids are not reused meanwhile."""
        key = (id(source), id(destination))
        self.repeats.pop(key, None)
        images = (source, destination)
        if tiles is not None or any(isinstance(i, MPSTemporaryImage) or i._storage is None for i in images):
            return
        work = None
        if not item.problem.empty:
            work = _Work(item.backend, self._bind(item, source, destination),
                         self.prepared(kernel, item.backend, item.problem.src_format), kernel, quiet=True,
                         step=_step(kernel, item.problem, source, destination))
        self._put(self.repeats, key, _Repeat(source, destination, source._storage, destination._storage,
                                             kernel._settings(), item.scratch, work), REPEATS)

    def repeat(self, kernel, cb, source, destination) -> bool:
        """The steady-state encode (most encodes of a network after its first pass): a source and
        destination (same storages) the kernel has encoded with the same settings, so validation and
        planning would give what they gave then; only the command buffer (checked by the caller) and
        the memory budget can differ. Records the same work and returns True, else returns False."""
        last = self.repeats.get((id(source), id(destination)))
        if last is None or last.source is not source or last.destination is not destination or \
                source._storage is not last.src_storage or destination._storage is not last.dst_storage or \
                last.settings != kernel._settings() or \
                memory.available(kernel._device, 0, last.scratch) is not None:
            return False
        work = last.work
        if work is not None:
            # the same call again; a new one where its label (a debug group) may have changed or is printed
            cb._record(work if work.label is None and not work.verbose else work.again(kernel))
        return True

    # -- gradient encodes
    def encode_gradient(self, kernel, cb, jobs: list[GradientJob], owner: str) -> None:
        """Plan and record validated gradient jobs (nothing is recorded if any is refused), then
        consume one read of each distinct temporary image they read."""
        device = kernel._device
        planned = [self.gradient_plan(job.problem, device) for job in jobs]
        new = _new_bytes(image for job in jobs for image in (job.gradient, job.source, job.destination)
                         if image is not None)
        scratch = max(item.scratch for item in planned)
        memory.check(owner, device, new, scratch, memory.available(device, new, scratch))
        for item, job in zip(planned, jobs):
            cb._record(_GradientWork(item, job, kernel))
        _consume_reads(image for job in jobs for image in (job.gradient, job.source))


    def encode_neuron_gradient(self, kernel, cb, jobs: list[NeuronGradientJob], owner: str) -> None:
        """Record validated neuron gradient jobs (nothing if the memory budget refuses them), then
        consume one read of each distinct temporary image they read."""
        device = kernel._device
        chosen = [backends.select_neuron_gradient(job.problem, int(job.gradient.featureChannelFormat), device)
                  for job in jobs]
        new = _new_bytes(image for job in jobs for image in (job.gradient, job.source, job.destination))
        # at most: the source slice, what is read of it, E, E·f' and dS in float64 (the reference)
        scratch = max(8 * job.problem.n_images * job.problem.in_channels
                      * (2 * job.problem.src_size[0] * job.problem.src_size[1] + 3 * job.problem.out_size[0]
                         * job.problem.out_size[1]) for job in jobs)
        memory.check(owner, device, new, scratch, memory.available(device, new, scratch))
        for backend, job in zip(chosen, jobs):
            cb._record(_NeuronGradientWork(backend, job, kernel))
        _consume_reads(image for job in jobs for image in (job.gradient, job.source))


def _new_bytes(images) -> int:
    """Bytes the storages ``images`` are the first to touch will take."""
    return sum(layout.storage_bytes for layout in unallocated(list(images)))


def _consume_reads(images) -> None:
    """One read of each distinct image (temporary images count their reads; others ignore it)."""
    seen = set()
    for image in images:
        if id(image) not in seen:
            seen.add(id(image))
            image._consume_read()


class _Work:
    """One recorded backend call; runs when its command buffer is committed. It holds no state of its
    own run, so the steady-state encode records one object again and again. ``step`` describes it for
    the CPU replay engine (``backends.onnx``), None for tiles."""

    __slots__ = ("backend", "bound", "prepared", "label", "verbose", "step")

    def __init__(self, backend, bound, prepared, kernel, quiet: bool = False, step=None):
        self.backend, self.bound, self.prepared, self.step = backend, bound, prepared, step
        self.verbose = _verbose(kernel)
        self.label = _label(kernel, f"{bound} on {backend.name}", quiet)

    def again(self, kernel) -> "_Work":
        return _Work(self.backend, self.bound, self.prepared, kernel, step=self.step)

    def __call__(self) -> None:
        if self.label is None:
            self.backend.run(self.bound, self.prepared)
        else:
            with torch.autograd.profiler.record_function(self.label):  # debug group -> profiler range
                self.backend.run(self.bound, self.prepared)


def _step(kernel, problem: ConvProblem, source, destination) -> onnx.Step | None:
    """A recorded encode as the CPU replay engine sees it: the kernel's effective weights now, and the
    two images' whole storages (None for views of other images and for weightless kernels)."""
    weights, bias, _ = kernel._params()
    if not isinstance(weights, KeptWeights) or source._root is not source or destination._root is not destination:
        return None
    return onnx.Step(problem, weights, bias, source._storage, destination._storage, destination._c,
                     isinstance(destination, MPSTemporaryImage))


class _LabelledWork:
    """A recorded call that runs ``_run``, inside a profiler range named by its debug-group label
    (``label``, None when the kernel asks for none)."""

    __slots__ = ()

    def __call__(self) -> None:
        if self.label is None:
            self._run()
        else:
            with torch.autograd.profiler.record_function(self.label):
                self._run()


class _GradientWork(_LabelledWork):
    """One recorded gradient: reads the incoming gradient's feature values, runs the backend's
    gradient, stores ``dL/dS`` in the destination's format and writes (or adds) the weight and bias
    gradients into their float32 views."""

    __slots__ = ("planned", "job", "weights", "device", "storages", "label")

    def __init__(self, planned: Planned, job: GradientJob, kernel):
        self.planned, self.job, self.device = planned, job, kernel._device
        self.weights = kernel._params()[0].array()
        self.storages = (job.gradient._ensure_storage(), job.source._ensure_storage(),
                         None if job.destination is None else job.destination._ensure_storage())
        self.label = _label(kernel, f"gradient on {planned.backend.name}")

    def _run(self) -> None:
        (problem, backend, plan, _), job = self.planned, self.job
        e_storage, src_storage, dst_storage = self.storages
        n, (he, we), o, c0 = problem.n_images, problem.out_size, problem.out_channels, job.gradient_channel0
        e = storage_to_values(e_storage[:n, :he, :we, c0:c0 + o], job.gradient.featureChannelFormat, torch.float32)
        d_s, d_w, d_b = backend.gradient(plan, src_storage, e, self.weights, self.device)
        if dst_storage is not None:
            i0, d0 = problem.src_image0, problem.dst_channel0
            stored = values_to_storage(torch.as_tensor(d_s), job.destination.featureChannelFormat)
            dst_storage[i0:i0 + n, :, :, d0:d0 + problem.in_channels] = stored.to(dst_storage.device)
        for target, value in ((job.weight_gradient, d_w), (job.bias_gradient, d_b)):
            if target is not None:
                value = torch.as_tensor(value).reshape(-1).to(torch.float32).cpu()
                target.add_(value) if job.accumulate else target.copy_(value)


class _NeuronGradientWork(_LabelledWork):
    """One recorded neuron gradient: the backend writes ``dL/dS = E·f'(S)`` into the destination's
    channel slice."""

    __slots__ = ("backend", "job", "prelu", "storages", "label")

    def __init__(self, backend, job: NeuronGradientJob, kernel):
        self.backend, self.job, self.prelu = backend, job, kernel._params()[2]
        self.storages = (job.gradient._ensure_storage(), job.source._ensure_storage(),
                         job.destination._ensure_storage())
        self.label = _label(kernel, f"neuron gradient on {backend.name}")

    def _run(self) -> None:
        job, (e_storage, src_storage, dst_storage) = self.job, self.storages
        p = job.problem
        n, (he, we), c0, ch = p.n_images, p.out_size, job.gradient_channel0, p.in_channels
        i0, d0 = p.src_image0, p.dst_channel0
        self.backend.neuron_gradient(p, src_storage, e_storage[:n, :he, :we, c0:c0 + ch],
                                     int(job.gradient.featureChannelFormat),
                                     dst_storage[i0:i0 + n, :, :, d0:d0 + ch], self.prelu)


def _verbose(kernel) -> bool:
    """Whether the kernel's recorded work is printed (``verbose``, ``MPS_LOG_INFO``)."""
    return bool(int(kernel._options) & _VERBOSE or _LOG_INFO)


def _label(kernel, what: str, quiet: bool = False) -> str | None:
    """The debug-group label of the kernel's work (``insertDebugGroups``), printed first when asked
    for and not ``quiet`` (a work kept for later encodes, not recorded now)."""
    if not quiet and _verbose(kernel):
        print(f"mpsconv: {kernel.label or type(kernel).__name__}: {what}", file=sys.stderr)
    return (kernel.label or type(kernel).__name__) if int(kernel._options) & _DEBUG_GROUPS else None


_LOG_INFO = bool(os.environ.get("MPS_LOG_INFO"))
_DEBUG_GROUPS, _VERBOSE = int(MPSKernelOptions.insertDebugGroups), int(MPSKernelOptions.verbose)
