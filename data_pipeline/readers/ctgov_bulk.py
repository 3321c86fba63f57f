"""The ClinicalTrials.gov API v2 bulk archive (`ctg-studies.json.zip`: one JSON study
per member), read member by member straight from the zip, never unpacked to disk.

Each member goes through ctgov_json.parse_study; a member that is not JSON, not a
study, unreadable (bad CRC, truncated) or larger than MAX_MEMBER_BYTES is counted by
reason under SOURCE, never fatal. Member names in the report are `<zip>:<member>`.
"""
from __future__ import annotations

import pathlib
import zipfile
import zlib

from data_pipeline import schema as S
from data_pipeline.build_report import BuildReport
from data_pipeline.readers import ctgov_json
from data_pipeline.readers.loop import SkipRecord, check_record, read_files

SOURCE = "ctgov_bulk"  # counts of the archive's members; Trials keep source ctgov_json
MAX_MEMBER_BYTES = 64 << 20  # a registry study is well under 5 MB; guards a zip bomb


def _open(path: pathlib.Path) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise SkipRecord("bad_zip", str(e)) from e


def _members(zf: zipfile.ZipFile, path: pathlib.Path):
  """(zip:member, (zf, info)) per file member; the archive closes when they are consumed."""
  with zf:
    for info in zf.infolist():
      if not info.is_dir():
        yield f"{path.name}:{info.filename}", (zf, info)


def _parse_member(member: tuple[zipfile.ZipFile, zipfile.ZipInfo], report: BuildReport
                  ) -> list[S.Trial]:
  zf, info = member
  if not info.filename.lower().endswith(".json"):
    raise SkipRecord("not_json_member")
  if info.file_size > MAX_MEMBER_BYTES:
    raise SkipRecord("member_too_large", f"{info.file_size} bytes")
  try:
    with zf.open(info) as f:
      data = f.read()  # never more than info.file_size: zipfile stops there
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
    raise SkipRecord("unreadable_member", type(e).__name__) from e
  study = ctgov_json.decode(data)
  check_record(study)
  return [ctgov_json.parse_study(study, report)]


def read_ctgov_zip(path_or_paths, report: BuildReport) -> list[S.Trial]:
  """Trials of API v2 bulk archives (.zip files, or folders of them), in member order."""
  return read_files(path_or_paths, ".zip", SOURCE, report, load=_open, records=_members,
                    parse=_parse_member)
