"""The ONNX Runtime backend: the whole captured graph as one ONNX model, MoE blocks as com.microsoft.MoE where
that op computes exactly the same function on the chosen execution provider, standard ONNX ops elsewhere."""
