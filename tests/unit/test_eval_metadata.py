"""Specification of class names and templates: CLIP_benchmark JSON files, text files, built-ins."""
import json

import pytest
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from vlmtrain.errors import EvalDataError
from vlmtrain.eval.metadata import load_classnames, load_templates, resolve_classnames_and_templates
from vlmtrain.eval.zeroshot import render_prompt


def test_json_file_picks_the_list_of_the_dataset(tmp_path):
    path = tmp_path / "en_classnames.json"
    path.write_text(json.dumps({"cifar10": ["airplane", "automobile"], "pets": ["abyssinian", "beagle"]}))

    assert load_classnames(path, "pets") == ["abyssinian", "beagle"]


def test_json_file_without_the_dataset_lists_its_entries(tmp_path):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"cifar10": ["a photo of a {c}."], "pets": ["a {c}, a type of pet."]}))

    with pytest.raises(EvalDataError, match="no entry for dataset 'cars'; it has: cifar10, pets"):
        load_templates(path, "cars")


def test_json_file_with_one_list_serves_any_dataset(tmp_path):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"mine": ["a photo of a {c}.", "{c}"]}))

    assert load_templates(path, "other") == ["a photo of a {c}.", "{c}"]


def test_json_template_without_placeholder_names_the_entry(tmp_path):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"set": ["a photo of a {c}.", "a photo"]}))

    with pytest.raises(EvalDataError, match=r"templates.json entry 2 \('a photo'\) has no \"\{c\}\""):
        load_templates(path, "set")


def test_builtin_imagenet_is_openais_classnames_and_80_templates():
    classnames = load_classnames("imagenet", "imagenet1k")
    templates = load_templates("imagenet", "imagenet1k")

    assert classnames == list(IMAGENET_CLASSNAMES) and len(classnames) == 1000
    assert len(templates) == 80
    assert [render_prompt(t, "tench") for t in templates] == [t("tench") for t in OPENAI_IMAGENET_TEMPLATES]


def test_unknown_name_that_is_no_file_lists_the_builtins(tmp_path):
    with pytest.raises(EvalDataError, match=r"imagenet21k is neither a file nor a built-in name \(built-in: imagenet\)"):
        load_classnames("imagenet21k", "set")


def test_dataset_json_files_are_found_in_the_set_directory(tmp_path):
    (tmp_path / "classnames.json").write_text(json.dumps({"set": ["cat", "dog"]}))
    (tmp_path / "zeroshot_classification_templates.json").write_text(json.dumps({"set": ["a {c}"]}))

    assert resolve_classnames_and_templates(tmp_path, "set") == (["cat", "dog"], ["a {c}"])
