/*
 * nemo_safetensors.h: reading and writing safetensors files (engine/safetensors.c), included by
 * nemo.h through nemo_ops.h, so it includes no system header and keeps macros out of prototypes.
 *
 * Reading maps the file (MAP_PRIVATE): tensors are zero-copy CPU views of the mapped bytes, so a
 * 24 GB file needs no 24 GB of RAM and is not counted in nemo_memory_current. Writing to such a
 * tensor is copy-on-write: the page becomes private memory and the file never changes.
 * A tensor whose bytes are not aligned to its element size in the file (a header length that
 * is not a multiple of 8, written by some other tool) is copied instead of viewed.
 *
 * Ownership: nemo_st_file is refcounted. nemo_st_open returns one reference, nemo_st_close drops
 * it; every tensor from nemo_st_tensor holds another through its storage, so the mapping lives
 * until the file is closed AND its last tensor is released. Tensors stay valid after close.
 *
 * Order: entry i (0 <= i < nemo_st_count) is the i-th tensor in file order (by data offset,
 * then name), which is also the order the reference writer uses.
 */
#ifndef NEMO_SAFETENSORS_H
#define NEMO_SAFETENSORS_H

typedef struct nemo_st_file nemo_st_file;   /* opaque */

/* Open, map and validate a file. NULL with an error naming the file and the problem
 * (NEMO_EIO: cannot open or map; NEMO_EFORMAT: malformed header or offsets). */
NEMO_API nemo_st_file *nemo_st_open(const char *path);
/* Drop the reference from nemo_st_open (NULL is ignored). */
NEMO_API void nemo_st_close(nemo_st_file *f);
/* Number of tensors (the "__metadata__" entry is not one); -1 on a NULL file. */
NEMO_API int nemo_st_count(const nemo_st_file *f);
/* Name of tensor i (borrowed, valid while f is open); NULL if i is out of range. */
NEMO_API const char *nemo_st_name(const nemo_st_file *f, int i);
/* The file's dtype string of tensor i ("F32", "BF16", "F8_E4M3", ...; borrowed) or NULL. */
NEMO_API const char *nemo_st_dtype_name(const nemo_st_file *f, int i);
/* Index of the tensor called name, or -1 (no error is set: a miss is a legitimate answer). */
NEMO_API int nemo_st_find(const nemo_st_file *f, const char *name);
/* A new (+1) CPU tensor viewing tensor i's bytes in the mapping (zero copy). NULL with an
 * error for an out-of-range i or a dtype nemo cannot hold (NEMO_EDTYPE names the dtype, the
 * tensor and the file). */
NEMO_API nemo_tensor *nemo_st_tensor(nemo_st_file *f, int i);
/* The "__metadata__" object re-serialised as compact JSON text (borrowed), or NULL if the
 * file has none. Values are always strings (a file with other values does not open). */
NEMO_API const char *nemo_st_metadata(const nemo_st_file *f);
/* Write n tensors (names[i] -> tensors[i]) and optional metadata (a JSON object of string
 * values, or NULL) to path. Layout as the reference writer: tensors sorted by dtype alignment
 * descending then name, packed without gaps; header padded with spaces to a multiple of 8.
 * Non-contiguous and non-CPU tensors are converted one at a time while writing. The bytes go
 * to "<path>.tmp.<pid>", which is fsync'ed and renamed over path: a failed save leaves any
 * existing file untouched (and files mapped from it stay valid). Returns 0 or < 0. */
NEMO_API int nemo_st_save(const char *path, int n, const char *const *names,
                          nemo_tensor *const *tensors, const char *metadata_json);
/* nemo_st_save in the background: the tensors are copied now (contiguous host copies: the
 * caller may change or free them as soon as this returns), and a thread writes the file.
 * nemo_st_job_wait joins it, frees the copies and returns nemo_st_save's result (its message in
 * nemo_last_error on failure). NULL (and nemo_last_error) when the copies cannot be made. */
typedef struct nemo_st_job nemo_st_job;
NEMO_API nemo_st_job *nemo_st_save_async(const char *path, int n, const char *const *names,
                                         nemo_tensor *const *tensors, const char *metadata_json);
NEMO_API int nemo_st_job_wait(nemo_st_job *job);

#endif /* NEMO_SAFETENSORS_H */
