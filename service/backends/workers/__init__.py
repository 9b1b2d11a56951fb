"""Models served by gRPC workers: TensorRT-LLM (`trtllm-serve --grpc`), vLLM and SGLang, each speaking its
smg-grpc-proto protocol. engine.py is the Engine; the rest is what it is made of."""
