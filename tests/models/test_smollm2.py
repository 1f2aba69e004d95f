"""`sparsejax smollm2`: the cached checkpoint folder and its one-line errors (the real
conversion downloads 98 MB and is not run here)."""

from sparsejax.models import smollm2


def test_a_converted_checkpoint_is_reused(tmp_path):
    folder = tmp_path / smollm2.CHECKPOINT_NAME
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    assert smollm2.smollm2_checkpoint(tmp_path) == folder


def test_missing_gguf_is_a_one_line_error(tmp_path, capsys):
    code = smollm2.main(["--cache-dir", str(tmp_path), "--gguf", str(tmp_path / "none.gguf")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: no GGUF file") and err.count("\n") == 1


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEJAX_CACHE", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path
    monkeypatch.delenv("SPARSEJAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert smollm2.default_cache_dir() == tmp_path / "xdg" / "sparsejax"
