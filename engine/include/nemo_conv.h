/* nemo_conv.h: (filled by its op family) */
