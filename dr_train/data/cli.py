"""Command line of data preparation: `ingest`, `synthetic`, `verify`, `sheet` (see launch/prepare.py --help)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from dr_train.catalog import catalog_for, select_relations
from dr_train.config import load_config
from dr_train.data.contact_sheet import write_contact_sheet
from dr_train.data.mask_import import load_mask_folder
from dr_train.data.prepare import discover_videos, prepare_dataset, video_spec
from dr_train.data.shards import dataset_file, load_manifest, read_shard, text_shape, verify_dataset
from dr_train.data.sources import make_encoder, synthetic_renderer
from dr_train.data.synthetic import write_synthetic_videos
from dr_train.data.video import conform_frames, conform_masks, decode_video, plan_conform
from dr_train.masks import latent_masks


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (model.preset picks the VAE/T5; the prepare section the clips)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                   help="override any config option, e.g. --set prepare.frames=61 (repeatable)")
    p.add_argument("--relations", help="'all' or a comma list of catalog names (default: every relation found)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Turn exemplar videos into WebDataset shards of cached latents.")
    sub = p.add_subparsers(dest="command", required=True)
    ingest = sub.add_parser("ingest", help="videos (+ masks) -> latents, text embeddings, shards")
    ingest.add_argument("inputs", nargs="+", type=Path,
                        help="video folders: <folder>/<relation>/<clip>.mp4, or NTU RGB+D files (any nesting)")
    ingest.add_argument("--out", required=True, type=Path,
                        help="dataset folder, created or extended: an existing dataset keeps every sample it has "
                             "(the clips of these inputs are added, or rebuilt where they changed)")
    ingest.add_argument("--replace", action="store_true",
                        help="a clip whose name (relation + file stem) the dataset already has from another video "
                             "replaces that sample (default: an error naming both videos)")
    ingest.add_argument("--masks-root", type=Path, help="mask folders as <root>/<relation>/<clip>/ or <root>/<clip>/ "
                                                        "(default: <clip>_masks/ beside each video)")
    _common(ingest)
    syn = sub.add_parser("synthetic", help="render the built-in synthetic relations and ingest them")
    syn.add_argument("--out", required=True, type=Path, help="dataset folder (created or extended)")
    syn.add_argument("--count", type=int, default=20, help="clips per relation")
    syn.add_argument("--seed", type=int, default=0)
    _common(syn)
    verify = sub.add_parser("verify", help="re-check a dataset against its manifest (sizes, sha256, samples)")
    verify.add_argument("dataset", type=Path)
    verify.add_argument("--quick", action="store_true", help="sizes and sha256 only, without decoding samples")
    sheet = sub.add_parser("sheet", help="PNG contact sheet of a sample: frames with both masks, latent masks")
    sheet.add_argument("dataset", type=Path, nargs="?", help="a prepared dataset (with --key or --relation)")
    sheet.add_argument("--key", help="sample key (see the manifest)")
    sheet.add_argument("--relation", help="the first sample of this relation")
    sheet.add_argument("--video", type=Path, help="or: a video, before ingest, with --masks")
    sheet.add_argument("--masks", type=Path, help="the video's colour-coded PNG mask folder")
    sheet.add_argument("--out", type=Path, required=True, help="PNG file to write")
    _common(sheet)
    return p


def _config(args):
    return load_config(args.config, list(args.set))


def _relations(args, catalog) -> list[str] | None:
    if not args.relations:
        return None
    return [r.name for r in select_relations(args.relations, catalog)]


def cmd_ingest(args) -> dict:
    cfg = _config(args)
    catalog = catalog_for(cfg)
    jobs = discover_videos(args.inputs, catalog, cfg.prepare.layout, _relations(args, catalog), args.masks_root)
    return prepare_dataset(args.out, jobs, cfg.prepare, make_encoder(cfg), replace=args.replace)


def cmd_synthetic(args) -> dict:
    cfg = _config(args)
    catalog = catalog_for(cfg)
    names = _relations(args, catalog) or list(catalog)
    p = cfg.prepare
    videos = write_synthetic_videos(args.out / "videos", names, args.count, p.frames, p.height, p.width,
                                    fps=p.fps or 30.0, seed=args.seed, render=synthetic_renderer(cfg))
    p.masks, p.layout = "png", "folders"
    jobs = discover_videos([videos], catalog, "folders", names)
    return prepare_dataset(args.out, jobs, p, make_encoder(cfg))


def cmd_verify(args) -> dict:
    problems, counts = verify_dataset(args.dataset, deep=not args.quick)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return {"dataset": str(args.dataset), "ok": not problems, "problems": len(problems), **counts}


def cmd_sheet(args) -> dict:
    if args.video is not None:
        if args.masks is None:
            raise ValueError("--video needs --masks (its colour-coded PNG mask folder)")
        cfg = _config(args).prepare
        decoded = decode_video(args.video, cfg.video_backend)
        n, h, w = decoded.frames.shape[:3]
        plan = plan_conform(n, decoded.fps, h, w, video_spec(cfg), str(args.video))
        colours = tuple(tuple(int(v) for v in c) for c in cfg.mask_colours)
        masks = conform_masks(load_mask_folder(args.masks, expected_frames=n, colours=colours).masks, plan)
        frames = conform_frames(decoded.frames, plan)
        latent = np.stack([latent_masks(torch.from_numpy(masks[:, s])).numpy() for s in range(2)])
        path = write_contact_sheet(args.out, frames, masks, latent, title=str(args.video))
        return {"sheet": str(path), "video": str(args.video)}

    if args.dataset is None or not (args.key or args.relation):
        raise ValueError("give a dataset with --key or --relation, or --video with --masks")
    manifest = load_manifest(args.dataset)
    for shard in manifest["shards"]:
        for s in shard["samples"]:
            if s["key"] == args.key or (args.key is None and shard["relation"] == args.relation):
                sample = next(read_shard(dataset_file(args.dataset, shard["name"]), {s["key"]}, text_shape(manifest),
                                         manifest["encoder"]["latent_channels"], shard))
                latent = np.stack([sample.mask_subject1, sample.mask_subject2])
                path = write_contact_sheet(args.out, sample.preview, sample.preview_masks.astype(np.float32) / 255.0,
                                           latent, title=f"{sample.key} ({sample.meta.get('source', '')})",
                                           frame_numbers=sample.meta.get("preview_frames"),
                                           clip_frames=sample.meta.get("frames"))
                return {"sheet": str(path), "key": sample.key}
    raise ValueError(f"dataset {args.dataset} has no sample {args.key or 'of relation ' + str(args.relation)}")


COMMANDS = {"ingest": cmd_ingest, "synthetic": cmd_synthetic, "verify": cmd_verify, "sheet": cmd_sheet}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        result = COMMANDS[args.command](args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    if args.command == "verify" and not result["ok"]:
        return 1
    return 0
