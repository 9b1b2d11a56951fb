"""The gRPC front door: the ChatService servicer and what the server wraps around it."""

from service.gen.llmserve.v1 import chat_pb2

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
