"""Export of one configuration as real integers: packed ``.npz`` or an ONNX QDQ model.

::

    info = export.export_member("runs/default", 3, format="onnx", out="member3.onnx")
    member = export.quantize_member(model, variables, scheme, config, input_shape)
    export.save_npz("member.npz", member); export.save_onnx("member.onnx", model, member)
"""

from nemo_jax._src.export import (ENCODINGS, EXPORT_FORMAT, FORMATS, ONNX_OPSET,
                                  ExportedActivation, ExportedLayer, ExportedMember,
                                  load_npz_kernels, member_sizes, pack_codes, precision_dict,
                                  quantize_member, save_npz, save_onnx, to_onnx, unpack_codes)
from nemo_jax._src.run.members import export_member, export_problem_member, load_run_member

__all__ = [
    "ENCODINGS", "EXPORT_FORMAT", "FORMATS", "ONNX_OPSET", "ExportedActivation",
    "ExportedLayer", "ExportedMember", "export_member", "export_problem_member",
    "load_npz_kernels", "load_run_member", "member_sizes", "pack_codes", "precision_dict",
    "quantize_member", "save_npz", "save_onnx", "to_onnx", "unpack_codes",
]
