"""Write protobufs built directly on the raw protobuf classes (the sink's hot path).

google-cloud-firestore builds every write through proto-plus wrappers, which cost about half a
millisecond of CPU per document — half of the sink's time in ``bench/firestore.py``. The writes
this sink sends are simple (a create with ``exists=false``, or an update of named top-level
fields with an ``update_time`` precondition, values of the JSON-like kinds below), so they are
encoded here on the raw classes and wrapped without copying.

This leans on two non-public details of the client (``DocumentReference._document_path`` and
``WriteBatch._add_write_pbs``), so :func:`self_test` compares this encoding with the library's
own for a sample of every value kind; the sink uses it only when they agree and otherwise falls
back to the public ``batch.create`` / ``batch.update`` (logged once).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from google.cloud.firestore_v1.types import document, write
from google.protobuf import struct_pb2

from sinks.firestore.model import DELETE, Change

_WRITE = write.Write.pb()
_VALUE = document.Value.pb()
_SIMPLE = re.compile(r"^[_a-zA-Z][_a-zA-Z0-9]*$")


def _set(target: Any, value: Any) -> None:
    """Fill the raw ``Value`` ``target`` from a Python value (the kinds the sink writes)."""
    if value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        target.boolean_value = value
    elif isinstance(value, int):
        target.integer_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, datetime):
        stamp = getattr(value, "timestamp_pb", None)
        if stamp is not None:  # DatetimeWithNanoseconds read back from Firestore
            target.timestamp_value.CopyFrom(stamp())
        else:
            target.timestamp_value.FromDatetime(value)
    elif isinstance(value, dict):
        fields = target.map_value.fields
        if not value:
            target.map_value.SetInParent()
        for key, item in value.items():
            _set(fields[key], item)
    elif isinstance(value, list | tuple):
        values = target.array_value.values
        target.array_value.SetInParent()
        for item in value:
            _set(values.add(), item)
    elif isinstance(value, bytes):
        target.bytes_value = value
    else:
        raise TypeError(f"cannot store a {type(value).__name__} in Firestore")


def _field_path(name: str) -> str:
    if _SIMPLE.match(name):
        return name
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def encode(change: Change, name: str, update_time: Any) -> write.Write:
    """One ``Write``: ``name`` is the document's full resource name."""
    raw = _WRITE()
    raw.update.name = name
    fields = raw.update.fields
    for key, value in change.fields.items():
        if value is not DELETE:
            _set(fields[key], value)
    if change.create:
        raw.current_document.exists = False
    else:
        raw.update_mask.field_paths.extend(sorted(_field_path(k) for k in change.fields))
        stamp = getattr(update_time, "timestamp_pb", None)
        if stamp is not None:
            raw.current_document.update_time.CopyFrom(stamp())
        else:
            raw.current_document.update_time.FromDatetime(update_time)
    return write.Write.wrap(raw)


SAMPLE = {"none": None, "yes": True, "n": 7, "x": 1.5, "s": "hé", "b": b"\x00",
          "t": datetime.fromisoformat("2025-10-09T08:53:20.123456+00:00"),
          "m": {"a": {"b": [1, "two", None]}, "e": {}}, "l": [], "sp ace": "q"}


def self_test(batch: Any, ref: Any, update_time: Any) -> bool:
    """Whether this module encodes exactly as the client does (and its internals are there)."""
    from google.cloud.firestore_v1 import DELETE_FIELD

    from sinks.firestore.model import Key

    try:
        name = ref._document_path
        fields = {k: v for k, v in SAMPLE.items() if k != "sp ace"}
        batch.create(ref, SAMPLE)
        batch.update(ref, {**fields, "gone": DELETE_FIELD},
                     option=ref._client.write_option(last_update_time=update_time))
        theirs = [w._pb.SerializeToString(deterministic=True) for w in batch._write_pbs]
        ours = [encode(Change(Key("c", "d"), True, SAMPLE), name, None),
                encode(Change(Key("c", "d"), False, {**fields, "gone": DELETE}), name,
                       update_time)]
        return hasattr(batch, "_add_write_pbs") and theirs == [
            w._pb.SerializeToString(deterministic=True) for w in ours]
    except Exception:  # noqa: BLE001 - any surprise means: use the public API
        return False
