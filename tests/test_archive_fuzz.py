"""Hostile archives (issue 7, item 2): random bytes and mutations of valid archives (truncation,
flipped bytes, fields and arrays changed under a recomputed digest, swapped fields and classes,
safetensors headers that lie about shapes, offsets and types).

Each load must: raise ``MPSArchiveError`` or give a working object; never raise another type;
trigger no audit event that would mean code runs (``hostile.FORBIDDEN_EVENTS``); and allocate at
most ``hostile.allocation_cap(archive size)``. tests/fuzz/ runs these with 20,000+ examples.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, strategies as st

import hostile
from mpsconv import MPSArchiveError, NSKeyedArchiver, NSKeyedUnarchiver

NAMES = sorted(hostile.base_archives())
hostile.warm_up()


def check(data: bytes) -> hostile.Guarded:
    g = hostile.Guarded(data)
    assert g.events == [], f"loading ran {g.events}"
    cap = hostile.allocation_cap(len(data))
    assert g.peak <= cap, f"loading {len(data)} bytes allocated {g.peak} bytes (cap {cap})"
    if g.error is not None:
        if not isinstance(g.error, MPSArchiveError):
            raise AssertionError(f"{type(g.error).__name__} instead of MPSArchiveError: {g.error}") from g.error
        assert str(g.error).startswith("NSKeyedUnarchiver"), str(g.error)
    else:  # what decodes is a whole object: it archives again, to the same fields
        again = NSKeyedArchiver.archivedData(withRootObject=g.value)
        assert type(NSKeyedUnarchiver.unarchivedObject(object, again)) is type(g.value)
    return g


# -- strategies

bases = st.sampled_from(NAMES).map(lambda name: hostile.base_archives()[name])

hostile_scalars = st.one_of(
    st.integers(-2**63, 2**63 - 1), st.sampled_from([0, -1, 1, 2**31, 2**32 + 1, 2**40, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.none(), st.booleans())
hostile_values = st.recursive(hostile_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)


def _paths(value, prefix=()):
    """Every (path) to a value inside nested fields."""
    yield prefix
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, prefix + (key,))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _paths(inner, prefix + (i,))


def _get(fields, path):
    for key in path:
        fields = fields[key]
    return fields


def _set(fields, path, value):
    _get(fields, path[:-1])[path[-1]] = value


@st.composite
def field_mutations(draw):
    """A valid archive's fields with one to three values replaced, removed, swapped or added,
    signed again."""
    class_name, fields, tensors = hostile.split(draw(bases))
    fields = copy.deepcopy(fields)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(fields) if p]
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "remove", "swap", "add"]))
        parent = _get(fields, path[:-1])
        if action == "replace":
            _set(fields, path, draw(hostile_values))
        elif action == "remove":
            parent.pop(path[-1])
        elif action == "swap":
            other = draw(st.sampled_from(paths))
            if not (other[:len(path)] == path or path[:len(other)] == other):  # neither inside the other
                a, b = _get(fields, path), _get(fields, other)
                _set(fields, path, b)
                _set(fields, other, a)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(hostile_values)
    return hostile.signed(class_name, fields, tensors)


arrays = st.one_of(
    st.integers(0, 300).map(lambda n: np.random.default_rng(n).standard_normal(n).astype(np.float32)),
    st.integers(0, 50).map(lambda n: np.full(n, np.nan, np.float32)),
    st.integers(0, 50).map(lambda n: np.full(n, np.inf, np.float32)),
    st.integers(0, 50).map(lambda n: np.arange(n, dtype=np.int64) - 25),
    st.just(np.zeros((2, 3, 0), np.float32)), st.just(np.float32(np.nan).reshape(())))


@st.composite
def tensor_mutations(draw):
    """A valid archive's arrays replaced (wrong size, type, NaN/Inf, 0-d), removed or added, signed again."""
    class_name, fields, tensors = hostile.split(draw(bases))
    tensors = dict(tensors)
    name = draw(st.sampled_from(sorted(tensors) + ["extra"]))
    if name in tensors and draw(st.booleans()):
        del tensors[name]
    else:
        tensors[name] = draw(arrays)
    return hostile.signed(class_name, fields, tensors)


@st.composite
def class_swaps(draw):
    class_name, fields, tensors = hostile.split(draw(bases))
    other = draw(st.one_of(st.sampled_from([hostile.split(b)[0] for b in hostile.base_archives().values()]),
                           st.sampled_from(["object", "MPSImage", "__builtins__", "os.system", ""]), st.text()))
    return hostile.signed(other, fields, tensors)


@st.composite
def header_lies(draw):
    """Signed archives whose safetensors header then claims other shapes, offsets or types."""
    class_name, fields, tensors = hostile.split(draw(bases))
    target = draw(st.sampled_from(sorted(tensors))) if tensors else None
    change = draw(st.sampled_from(["shape", "offsets", "dtype", "entry", "metadata"]))
    value = draw(st.one_of(st.lists(st.integers(0, 2**62), max_size=4), st.integers(-2**63, 2**64),
                           st.sampled_from(["F64", "U8", "BOOL", "object", "F32", "I64"]), hostile_values))

    def edit(header):
        if change == "metadata":
            header["__metadata__"][draw(st.sampled_from(["format", "version", "class", "fields", "digest"]))] = value
        elif target is None or change == "entry":
            header[draw(st.sampled_from(["weights", "x"]))] = value
        else:
            header[target][{"shape": "shape", "offsets": "data_offsets", "dtype": "dtype"}[change]] = value

    return hostile.signed(class_name, fields, tensors, header_edit=edit)


@st.composite
def truncations(draw):
    data = draw(bases)
    return data[: draw(st.integers(0, len(data) - 1))]


@st.composite
def flips(draw):
    data = bytearray(draw(bases))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    return bytes(data)


# -- tests


def test_the_valid_archives_load_under_the_guard():
    for name in NAMES:
        g = check(hostile.base_archives()[name])
        assert g.error is None, (name, g.error)


@given(st.binary(max_size=4096))
def test_random_bytes(data):
    assert check(data).error is not None


@given(truncations())
def test_truncated_archives(data):
    assert check(data).error is not None


@given(flips())
def test_flipped_bytes(data):
    check(data)


@given(field_mutations())
def test_fields_changed_under_a_valid_digest(data):
    check(data)


@given(tensor_mutations())
def test_arrays_changed_under_a_valid_digest(data):
    check(data)


@given(class_swaps())
def test_class_names_swapped(data):
    check(data)


@given(header_lies())
def test_headers_that_lie(data):
    check(data)


@pytest.mark.parametrize("channels", [64, 256])
def test_allocation_stays_under_the_cap_for_large_archives(channels):
    """The cap is linear in the archive: a 3x3 convolution of 256 -> 256 channels (2.4 MB)."""
    rng = np.random.default_rng(channels)
    from helpers import conv

    k = conv(3, 3, channels, channels, weights=rng.standard_normal(9 * channels * channels).astype(np.float32))
    data = NSKeyedArchiver.archivedData(withRootObject=k)
    g = check(data)
    assert g.error is None and g.peak <= hostile.allocation_cap(len(data))


def test_an_archive_over_the_size_limit_is_refused_before_it_is_read(monkeypatch, tmp_path):
    from mpsconv import load

    data = hostile.base_archives()["convolution"]
    monkeypatch.setenv("MPSCONV_MAX_ARCHIVE_BYTES", str(len(data) - 1))
    with pytest.raises(MPSArchiveError, match=f"has {len(data)} bytes; the limit is {len(data) - 1}"):
        NSKeyedUnarchiver(data)
    (tmp_path / "k.mpsconv").write_bytes(data)
    with pytest.raises(MPSArchiveError, match="the limit is"):
        load(tmp_path / "k.mpsconv")
    monkeypatch.setenv("MPSCONV_MAX_ARCHIVE_BYTES", "1K")
    with pytest.raises(MPSArchiveError, match="the limit is 1024"):
        NSKeyedUnarchiver(data)


class _Endless:
    """A file that never ends (as ``/dev/zero`` or a pipe: no size to check first), counting reads."""

    def __init__(self, prefix: bytes):
        self.prefix, self.read_bytes = prefix, 0

    def read(self, n=-1):
        assert n >= 0, "an unbounded read"
        out = (self.prefix + b"\0" * n)[:n]
        self.prefix = self.prefix[n:]
        self.read_bytes += n
        return out


def test_an_archive_without_a_size_is_read_only_as_far_as_its_header_declares(tmp_path):
    from mpsconv import coding, load

    data = hostile.base_archives()["convolution"]
    endless = _Endless(data)
    with pytest.raises(MPSArchiveError, match="more bytes than its header declares"):
        coding._read_bounded(endless, 1 << 30, "pipe")
    assert endless.read_bytes == len(data) + 1
    zeros = _Endless(b"")
    with pytest.raises(MPSArchiveError, match="more bytes than its header declares"):  # /dev/zero: 9 bytes read
        coding._read_bounded(zeros, 1 << 30, "zeros")
    assert zeros.read_bytes == 9
    lying = _Endless((1 << 40).to_bytes(8, "little"))
    with pytest.raises(MPSArchiveError, match="declares a header of"):
        coding._read_bounded(lying, 1 << 30, "lying")
    (tmp_path / "k.mpsconv").write_bytes(data + b"junk")
    with pytest.raises(MPSArchiveError, match="more bytes than its header declares"):
        load(tmp_path / "k.mpsconv")
    (tmp_path / "k.mpsconv").write_bytes(data)
    assert load(tmp_path / "k.mpsconv") is not None
