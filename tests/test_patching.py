"""JSON Pointer escaping and the copy-on-write edit API."""

from __future__ import annotations

import copy

import jsonpatch
import pytest

from app.patching import ObjectEditor, ObjectShapeError, describe, escape, lookup, pointer


def test_patching_escape_follows_rfc6901():
    assert escape("kubernetes.azure.com/agentpool") == "kubernetes.azure.com~1agentpool"
    assert escape("a~/b") == "a~0~1b"
    assert pointer(("spec", "containers", 0, "a/b")) == "/spec/containers/0/a~1b"
    assert pointer(("metadata", "labels", "x~y")) == "/metadata/labels/x~0y"
    assert pointer(("spec", "", 7)) == "/spec//7"  # an empty key is a key
    assert pointer(()) == ""  # the whole document
    assert escape("plain") == "plain" and escape(3) == "3"


def test_patching_describe_quotes_odd_keys():
    assert describe(("spec", "nodeSelector", "kubernetes.io/os")) == 'spec.nodeSelector["kubernetes.io/os"]'
    assert describe(("spec", "containers", 1, "name")) == "spec.containers[1].name"


def test_patching_lookup_defaults():
    obj = {"a": {"b": [1, {"c": None}]}}
    assert lookup(obj, ("a", "b", 0)) == 1
    assert lookup(obj, ("a", "b", 5), "d") == "d"
    assert lookup(obj, ("a", "b", 1, "c"), "d") == "d"
    assert lookup(obj, ("a", "x"), "d") == "d"
    assert lookup(obj, ("a", "b", "k"), "d") == "d"
    assert lookup(obj, (0,), "d") == "d"


def roundtrip(obj, edits):
    original = copy.deepcopy(obj)
    editor = ObjectEditor(obj)
    for edit in edits:
        edit(editor)
    assert obj == original, "the editor must not change the object it was given"
    assert jsonpatch.apply_patch(original, editor.ops) == editor.current
    return editor


def test_patching_set_creates_missing_maps_in_one_op():
    editor = roundtrip({"spec": {}}, [lambda e: e.set(("spec", "nodeSelector", "a/b"), "x")])
    assert editor.ops == [{"op": "add", "path": "/spec/nodeSelector", "value": {"a/b": "x"}}]


def test_patching_set_deeply_missing():
    editor = roundtrip({}, [lambda e: e.set(("spec", "template", "spec", "k"), 1)])
    assert editor.ops == [{"op": "add", "path": "/spec", "value": {"template": {"spec": {"k": 1}}}}]


def test_patching_set_existing_key_replaces_and_same_value_is_no_op():
    editor = roundtrip({"m": {"k": "old"}}, [lambda e: e.set(("m", "k"), "new"),
                                             lambda e: e.set(("m", "k"), "new")])
    assert editor.ops == [{"op": "replace", "path": "/m/k", "value": "new"}]


def test_patching_set_distinguishes_types():
    editor = roundtrip({"m": {"k": 1}}, [lambda e: e.set(("m", "k"), True)])
    assert editor.ops[0]["op"] == "replace"


def test_patching_set_list_items():
    editor = roundtrip({"l": [{"p": "a"}, {"p": "b"}]},
                       [lambda e: e.set(("l", 1, "p"), "c"), lambda e: e.set(("l", 0), {"p": "a"})])
    assert editor.ops == [{"op": "replace", "path": "/l/1/p", "value": "c"}]
    editor = roundtrip({"l": ["a"]}, [lambda e: e.set(("l", 0), "b")])
    assert editor.ops == [{"op": "replace", "path": "/l/0", "value": "b"}]


def test_patching_later_edits_see_earlier_ones():
    editor = roundtrip({"spec": {}}, [lambda e: e.set(("spec", "s", "a"), 1),
                                      lambda e: e.set(("spec", "s", "b"), 2),
                                      lambda e: e.remove(("spec", "s", "a"))])
    assert editor.current == {"spec": {"s": {"b": 2}}}
    assert len(editor.ops) == 3


def test_patching_remove():
    editor = roundtrip({"m": {"k": 1, "n": None}}, [lambda e: e.remove(("m", "k")),
                                                    lambda e: e.remove(("m", "gone")),
                                                    lambda e: e.remove(("m", "n"))])
    assert editor.ops == [{"op": "remove", "path": "/m/k"}, {"op": "remove", "path": "/m/n"}]


def test_patching_append_adds_at_the_end_and_keeps_what_is_there():
    tolerations = [{"key": "a/b", "operator": "Exists"}]
    editor = roundtrip({"spec": {"tolerations": tolerations}},
                       [lambda e: e.append(("spec", "tolerations"), {"key": "x"}),
                        lambda e: e.append(("spec", "tolerations"), {"key": "y"})])
    assert editor.ops == [{"op": "add", "path": "/spec/tolerations/-", "value": {"key": "x"}},
                          {"op": "add", "path": "/spec/tolerations/-", "value": {"key": "y"}}]
    assert editor.current["spec"]["tolerations"] == [*tolerations, {"key": "x"}, {"key": "y"}]
    assert tolerations == [{"key": "a/b", "operator": "Exists"}]  # copied, not appended to


@pytest.mark.parametrize("obj, op", [
    ({"spec": {}}, {"op": "add", "path": "/spec/tolerations", "value": [{"key": "x"}]}),
    ({"spec": {"tolerations": None}},
     {"op": "add", "path": "/spec/tolerations", "value": [{"key": "x"}]}),
    ({}, {"op": "add", "path": "/spec", "value": {"tolerations": [{"key": "x"}]}}),
])
def test_patching_append_creates_a_missing_list(obj, op):
    editor = roundtrip(obj, [lambda e: e.append(("spec", "tolerations"), {"key": "x"}),
                             lambda e: e.append(("spec", "tolerations"), {"key": "y"})])
    assert editor.ops == [op, {"op": "add", "path": "/spec/tolerations/-", "value": {"key": "y"}}]


def test_patching_append_escapes_the_path_once():
    editor = roundtrip({"m": {"a/b~c": []}}, [lambda e: e.append(("m", "a/b~c"), 1)])
    assert editor.ops == [{"op": "add", "path": "/m/a~1b~0c/-", "value": 1}]


def test_patching_append_to_a_non_list_is_a_shape_error():
    with pytest.raises(ObjectShapeError, match="spec.tolerations must be a list"):
        ObjectEditor({"spec": {"tolerations": {"key": "x"}}}).append(("spec", "tolerations"), {})


@pytest.mark.parametrize("obj, path", [
    ({"spec": "x"}, ("spec", "k")),
    ({"spec": {"a": 3}}, ("spec", "a", "b")),
    ({"l": []}, ("l", 0, "k")),
    ({"l": {"k": 1}}, ("l", 0, "k")),
    ({"l": [1]}, ("l", 3)),
    ({"s": ["x"]}, ("s", "k", "j")),
])
def test_patching_set_into_wrong_shapes_is_a_shape_error(obj, path):
    with pytest.raises(ObjectShapeError):
        ObjectEditor(obj).set(path, "v")


def test_patching_set_needs_a_path():
    with pytest.raises(ValueError):
        ObjectEditor({}).set((), 1)
