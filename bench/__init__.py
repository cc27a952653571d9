"""DermaSeg's performance benchmark: ``python -m bench`` writes docs/performance.md.

One command measures, in one run, on one real photo: the raw ONNX Runtime session, the same network in
Keras (in a separate process, so that TensorFlow never shares a process with ONNX Runtime), the service
end to end over HTTP, the float32 / float16 / int8 variants, the floating-point work per image against
this CPU's peak, and the service's memory. Modules, one per concern: ``timing`` (repetitions and
percentiles), ``machine``, ``inputs`` (photo and validation photos), ``raw``, ``pipeline``,
``keras_compare``, ``http_load``, ``memory``, ``variants``, ``flops``, ``report`` and ``cli``. Apart from
it: ``model_cost`` (a candidate model's served pipeline against the shipped one's, side by side; `make
model-cost`), ``v2_latency`` and ``train_precision``.
"""
