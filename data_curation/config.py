"""Settings of the ``curate`` CLI (flags, or a YAML file via ``--config``)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _f(default, help_text: str):  # noqa: ANN001, ANN202 - tiny helper for dataclass fields with help
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class CurateConfig:
    inputs: list[str] = _f([], "input folders or files (walked recursively)")
    output: str = _f("", "output folder OUT (shards/, manifest.json, rejects.jsonl)")
    workers: int = _f(1, "worker processes (0 or 1: run in this process)")
    salt_file: str = _f("", "file holding the secret salt for identity hashes; must lie outside OUT "
                            "(default: $SCANMAE_CURATE_SALT, else ~/.config/scanmae/curate_salt)")
    # intensity
    ct_windows: list[str] = _f(["soft_tissue"], "CT windows stacked as channels: presets brain, subdural, "
                                                "stroke, bone, lung, soft_tissue, abdomen, liver, 'dicom' "
                                                "(the file's own window), 'L:W' (e.g. 40:80), or 'hu16' "
                                                "(lossless HU+1024 as uint16)")
    percentile_low: float = _f(0.5, "lower percentile for robust scaling (MR, PET, X-ray, US, NIfTI)")
    percentile_high: float = _f(99.5, "upper percentile for robust scaling")
    percentile_scope: str = _f("volume", "'volume' (one range per NIfTI/npz 3D volume, DICOM series and "
                                         "multi-frame DICOM file) or 'image'")
    use_dicom_voi: bool = _f(True, "non-CT DICOM: use the file's VOI LUT / window when present")
    output_bits: int = _f(8, "bits of scaled grayscale output: 8 or 16")
    # geometry
    size_policy: str = _f("max:1024", "'keep', 'max:N' (shrink so the longer side <= N) or 'shorter:N' "
                                      "(shrink so the shorter side = N)")
    min_size: int = _f(16, "reject images whose shorter side is below this")
    nifti_axes: list[str] = _f(["axial"], "NIfTI slicing axes in canonical RAS: axial, coronal, sagittal")
    dicom_reslice: list[str] = _f([], "also cut DICOM series (single-frame files of one series forming a regular "
                                      "stack) along these planes: axial, coronal, sagittal (the native plane is "
                                      "skipped)")
    dicom_reslice_isotropic: bool = _f(True, "resample resliced planes to square pixels (the slice axis "
                                             "to the in-plane spacing)")
    reslice_memory_mb: float = _f(256.0, "most memory one slab of a reslice may take (the volume itself is "
                                         "buffered on disk in $TMPDIR as float32)")
    nifti_modality: str = _f("MR", "modality written for NIfTI inputs (CT applies the CT windows)")
    background_threshold: float = _f(0.04, "volume slices: a pixel is foreground above this fraction "
                                           "of the output range")
    min_foreground: float = _f(0.02, "volume slices with a smaller foreground fraction are skipped "
                                     "(and counted)")
    # policy
    reject_burned_in: bool = _f(True, "reject DICOM files with BurnedInAnnotation=YES")
    public_source_names: bool = _f(False, "write the input folder / file names into shards and manifest as the "
                                          "samples' source (only where they identify no one, e.g. public "
                                          "datasets); by default a keyed digest of the name")
    subject_key: str = _f("patient", "what one subject is for the patient-level split of DICOM data: 'patient' "
                                     "(PatientID, else PatientName, else the study), 'study' (StudyInstanceUID) or "
                                     "'series' (SeriesInstanceUID); e.g. 'study' when an anonymiser gave every "
                                     "patient the same PatientID")
    split_fractions: list[float] = _f([0.9, 0.05, 0.05], "train/val/test fractions for subjects "
                                                          "without a given split")
    near_duplicates: bool = _f(False, "also drop near duplicates: samples whose perceptual hash lies within "
                                      "--near_duplicate_bits of a sample of another subject already written")
    near_duplicate_bits: int = _f(16, "largest Hamming distance (of 255 bits) counted as a near duplicate")
    shard_maxcount: int = _f(2000, "maximum samples per shard")
    shard_maxsize: float = _f(1e9, "maximum bytes per shard")
    png_compress_level: int = _f(1, "zlib level of stored PNGs (1: fastest encode, ~15% larger than 6)")
    image_modality: str = _f("OT", "modality written for 2D image files (e.g. XR, photo)")
    progress: bool = _f(True, "show a progress bar")
    merge: list[str] = _f([], "merge mode: combine these finished curate outputs (PART_DIR...; same salt and "
                              "settings, e.g. the parts of launch/slurm/curate_array.sbatch) into --output; "
                              "their shards are moved")
