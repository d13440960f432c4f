"""The research tier: studies, measurements and what lost, each with the test that keeps it runnable.

Every script runs from the repository root (`python research/<study>.py --help`); their conclusions are
in docs/results.md. Anything here may import any package; no product package (sdk, train, quantize,
converters, demo) imports from here.

Studies: int8_noise_floor, int8_float_sets, int8_runtime_gap, int8_disagreements, onnx_int8_saturation,
onnx_int8_schemes, qat_ranges, ablation, students, student_parts. What lost: qat (pt2e QAT after
post-training int8), gptq (error-compensating weight rounding); weights holds their shared helpers.
"""
