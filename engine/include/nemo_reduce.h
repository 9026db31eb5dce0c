/* nemo_reduce.h: (filled by its op family) */
