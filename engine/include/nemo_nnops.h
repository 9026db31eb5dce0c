/* nemo_nnops.h: (filled by its op family) */
