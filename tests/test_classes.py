import pytest

from hmar.classes import display_name, resolve_class
from hmar.errors import InputError


@pytest.mark.parametrize("value, index", [(207, 207), ("207", 207), ("golden retriever", 207), ("Golden_Retriever", 207), ("tabby cat", 281), ("TABBY", 281)])
def test_imagenet_names_and_numbers(value, index):
    assert resolve_class(value, 1000) == index


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(InputError, match=r"unknown class name 'golden retreiver'; did you mean 'golden retriever'"):
        resolve_class("golden retreiver", 1000)


def test_out_of_range_number():
    with pytest.raises(InputError, match=r"class 1000 is out of range: this model has classes 0..999"):
        resolve_class(1000, 1000)
    with pytest.raises(InputError, match="out of range"):
        resolve_class(-1, 1000)


def test_a_models_own_class_names():
    names = ["red circle", "blue square", "star"]
    assert resolve_class("Blue-Square", 3, names) == 1
    assert resolve_class("square", 3, names) == 1  # a unique part of a name
    assert display_name(2, 3, names) == "star" and display_name(3, 3, names) == "unconditional"
    assert display_name(207, 1000) == "golden retriever"
