"""Weight-only quantization (``--quantize int8|int4``): the formats and their torchao
configs (:mod:`.formats`), PyTorch's CPU int8 kernel as a layer (:mod:`.int8_linear`), and the
on-disk cache of quantized weights (:mod:`.cache`)."""
