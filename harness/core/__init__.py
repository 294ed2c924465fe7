"""The base layer every other package stands on: user errors, atomic files, the frozen plain-data
model, the torch.distributed environment. Nothing here imports another part of the harness."""
