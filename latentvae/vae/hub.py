"""Hub ids (`org/name`): the config and the chosen weights fetched with huggingface_hub, never a whole pipeline.

The hub cache, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1, HF_TOKEN or `hf auth login` and revisions
work as for any hub library; every failure is one line naming the id and why (`_hub_error`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import convert
from .folder import choose_weights, load_diffusers_folder, load_single_file
from .spec import HUB_OPTIONS, NotAnAutoencoder, VaeSpec, check_applies


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hub_error(spec: VaeSpec, repo_id: str, revision: Optional[str], e: Exception) -> NotAnAutoencoder:
    """One line: which was tried (no such local path, so the hub id), and why the hub gave nothing."""
    import huggingface_hub as hub
    from huggingface_hub import utils as hu

    def cls(name):
        return getattr(hu, name, None) or getattr(getattr(hub, "errors", None), name, None) or ()

    at = f" at revision {revision}" if revision else ""
    if isinstance(e, cls("GatedRepoError")):
        why = f"{repo_id} is gated: accept its terms on the hub, then log in (`hf auth login` or HF_TOKEN)"
    elif isinstance(e, cls("RevisionNotFoundError")):
        why = f"{repo_id} has no revision {revision!r}"
    elif isinstance(e, cls("RepositoryNotFoundError")):
        why = (f"the hub has no repo {repo_id} (or it is private: log in with `hf auth login` or set HF_TOKEN)")
    elif isinstance(e, cls("IncompleteSnapshotError")):
        why = f"the cached copy of {repo_id}{at} lacks files and the hub could not be reached ({_first_line(e)})"
    elif isinstance(e, cls("LocalEntryNotFoundError")) or isinstance(e, cls("OfflineModeIsEnabled")):
        cache = hub.constants.HF_HUB_CACHE
        if _offline():
            why = (f"{repo_id}{at} is not in the hub cache {cache} and HF_HUB_OFFLINE=1 forbids downloading it "
                   "(download it once online, or point HF_HOME / HF_HUB_CACHE at a cache holding it)")
        else:
            cause = e.__cause__ or e.__context__
            why = (f"{repo_id}{at} is not in the hub cache {cache} and the hub could not be reached"
                   + (f" ({type(cause).__name__}: {_first_line(cause)})" if cause is not None else ""))
    elif isinstance(e, cls("HFValidationError")):
        why = f"not a valid hub id ({_first_line(e)})"
    else:
        why = f"{type(e).__name__}: {_first_line(e)}"
    return NotAnAutoencoder(f"{spec.text}: no local file or folder {spec.target}, so it was tried as a Hugging Face "
                            f"hub id: {why}")


def _offline() -> bool:
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else constants.HF_HUB_OFFLINE)


def _snapshot(spec: VaeSpec, repo_id: str, revision: Optional[str], patterns: list[str],
              local_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      local_files_only=local_only))
    except Exception as e:  # the hub's errors (HTTP, offline, validation): one line naming the id
        raise _hub_error(spec, repo_id, revision, e) from e


def _hub_listing(repo_id: str, commit: str) -> Optional[list[str]]:
    """The repo's files at `commit` as the hub listed them, or None when the hub did not answer (offline,
    unreachable): the snapshot_download just made cached that listing if it was online."""
    import huggingface_hub as hub

    if _offline():
        return None
    try:
        if hasattr(hub, "get_cached_repo_tree"):
            return [f.path for f in hub.get_cached_repo_tree(repo_id, revision=commit)]
        return hub.list_repo_files(repo_id, revision=commit)  # an older huggingface_hub: ask the hub
    except Exception:  # not listed: the download fell back on the cache (no network, hub down)
        return None


def _names_in(snapshot: Path, prefix: str, listing: Optional[list[str]]) -> list[str]:
    """File names in the repo folder `prefix`: those cached, and those the hub listed."""
    folder = snapshot / prefix if prefix else snapshot
    names = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    head = f"{prefix}/" if prefix else ""
    names |= {p[len(head):] for p in listing or () if p.startswith(head) and "/" not in p[len(head):]}
    return sorted(names)


def _in_repo(listing: Optional[list[str]]) -> str:
    return ("in the repo" if listing is not None else
            "in the hub cache (the hub did not answer: HF_HUB_OFFLINE=1, or no connection)")


def load_hub(spec: VaeSpec, norm_num_groups: Optional[int]):
    """A hub id -> (module, origin fields)."""
    repo_id, revision, sub, file = spec.target, spec.get("revision"), spec.get("subfolder"), spec.get("file")
    check_applies(spec, HUB_OPTIONS + (("norm_num_groups",) if file else ()), "a hub id")
    if file is not None:
        if Path(file).suffix in convert.PICKLE_SUFFIXES and not spec.allow_pickle:  # refused before downloading
            raise NotAnAutoencoder(f"{spec.text}: {file} is a pickle-based torch file; only safetensors are read by "
                                   "default. Add the option [allow_pickle=yes] to read it with "
                                   "torch.load(weights_only=True), or convert it once to safetensors")
        rel = f"{sub}/{file}" if sub else file
        snapshot = _snapshot(spec, repo_id, revision, [rel])
        if not (snapshot / rel).is_file():
            raise NotAnAutoencoder(f"{spec.text} (hub {repo_id}, commit {snapshot.name[:12]}): no file {rel} "
                                   + _in_repo(_hub_listing(repo_id, snapshot.name)))
        return load_single_file(spec, snapshot / rel, norm_num_groups), dict(
            kind="hub", path=snapshot / rel, repo_id=repo_id, revision=snapshot.name, subfolder=sub)
    first = [f"{sub}/config.json"] if sub else ["config.json", "model_index.json", "vae/config.json"]
    snapshot = _snapshot(spec, repo_id, revision, first)
    commit = snapshot.name
    listing = _hub_listing(repo_id, commit)
    where = f"{spec.text} (hub {repo_id}, commit {commit[:12]})"
    if sub is None and not (snapshot / "config.json").is_file():
        if not (snapshot / "model_index.json").is_file():
            raise NotAnAutoencoder(f"{where}: neither config.json (a diffusers VAE repo) nor model_index.json (a "
                                   f"pipeline repo, whose vae/ is used) {_in_repo(listing)}; for one weight file "
                                   "in it add [file=NAME], for another folder [subfolder=DIR]")
        sub = "vae"
    if not (snapshot / (f"{sub}/config.json" if sub else "config.json")).is_file():
        raise NotAnAutoencoder(f"{where}: no {sub + '/' if sub else ''}config.json {_in_repo(listing)}")
    online = listing is not None
    names = _names_in(snapshot, sub or "", listing)
    head = f"{sub}/" if sub else ""
    variant, files = choose_weights(names, spec.get("variant"), spec.allow_pickle, f"{where}{'/' + sub if sub else ''}",
                                    route=lambda name: f"Download it (hf download {repo_id} {head}{name} --local-dir "
                                                       f"DIR), then " + convert.pickle_route(f"DIR/{head}{name}"))
    snapshot = _snapshot(spec, repo_id, commit, [head + "config.json"] + [head + f for f in files],
                         local_only=not online)  # no second round of retries when the hub did not answer
    missing = [head + f for f in files if not (snapshot / head / f).is_file()]
    if missing:
        raise NotAnAutoencoder(f"{where}: no {', '.join(missing)} {_in_repo(None)}")
    folder = snapshot / sub if sub else snapshot
    vae, variant = load_diffusers_folder(folder, variant, spec.allow_pickle, names=files)
    return vae, dict(kind="hub", path=folder, repo_id=repo_id, revision=commit, subfolder=sub, variant=variant)
