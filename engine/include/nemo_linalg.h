/* nemo_linalg.h: (filled by its op family) */
