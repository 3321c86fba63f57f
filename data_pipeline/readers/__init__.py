"""Readers: raw source files -> Trials (registries, CT Open protocols), question Examples
(CT Open) or rows (Evidence Inference). All of them go through loop.read_files, so a
malformed file or record is counted in the BuildReport by reason and never stops a build."""
