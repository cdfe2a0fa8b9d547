"""helpers.infra.files: the file-name slug, the tolerant JSON/YAML readers, the umask read without changing it."""

import os
import stat

import pytest

from helpers.infra.files import atomic_write_text, current_umask, read_json_or_none, read_yaml_or_none, slug


@pytest.mark.parametrize("text, expected", [
    ("ViT-B-32", "ViT-B-32"),
    ("hf-hub:timm/ViT-B-16-SigLIP", "hf-hub_timm_ViT-B-16-SigLIP"),
    ("/models/a folder/with a long name/open_clip_pytorch_model.bin",
     "der_with_a_long_name_open_clip_pytorch_model.bin"),
    ("local-dir:/data/weights/", "local-dir_data_weights"),
    ("///", "model"),
])
def test_cache_folder_slugs_stay_as_they_were(text, expected):
    # the embedding cache names its folders so (helpers.infra.cache): another name would miss every existing cache
    assert slug(text, 48, default="model") == expected


def test_slug_keeps_what_it_is_told_to():
    assert slug("ViT-B-32", keep=".", default="none") == "ViT_B_32"  # a sweep point's id parts with `-` and `_`
    assert slug("{set: [a, b]}", default="run") == "set_a_b"
    assert slug(" ", default="run") == "run"
    assert slug(0.5) == "0.5"


def test_tolerant_readers_give_none_for_missing_damaged_or_other_values(tmp_path):
    good, broken, binary = tmp_path / "good", tmp_path / "broken", tmp_path / "binary"
    good.write_text('{"a": [1, 2]}')
    broken.write_text('{"a": [1, ')
    binary.write_bytes(b"\xff\xfe\x00{")
    assert read_json_or_none(good) == {"a": [1, 2]} == read_yaml_or_none(good)
    assert read_json_or_none(good, dict) == {"a": [1, 2]}
    assert read_json_or_none(good, list) is None and read_yaml_or_none(good, list) is None
    for path in (broken, binary, tmp_path / "missing", tmp_path):
        assert read_json_or_none(path) is None and read_yaml_or_none(path) is None
    (tmp_path / "date.yaml").write_text("when: 2024-13-01\n")  # PyYAML raises ValueError for it
    assert read_yaml_or_none(tmp_path / "date.yaml") is None
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfa: 1\n")  # as an editor on Windows saves it
    assert read_yaml_or_none(tmp_path / "bom.yaml") == {"a": 1}


def test_umask_is_read_without_changing_it_and_files_follow_it(tmp_path):
    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert current_umask() == 0o027  # still
        atomic_write_text(tmp_path / "f", "x")
        assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    finally:
        os.umask(previous)
