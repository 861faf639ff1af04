"""fp16/bf16 in the graph: an fp32 reference run measured, fp32 islands chosen by rules, and the
strongly typed graph (and its fp32 emulation) written from that plan."""
