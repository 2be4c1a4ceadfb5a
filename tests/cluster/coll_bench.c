/* The forward's collective and its alternative, alone, over whatever network
 * mpirun gives: for each payload of C cells, an allgather of 1 + 3C doubles
 * per rank (what distgn's forward exchanges: a flag, then count, mean and M2
 * per cell; the receive buffer grows with the ranks) and an allreduce of
 * 1 + 3C doubles (packed per-cell sums, constant in the ranks), blocking
 * (MPI_Allgather / MPI_Allreduce) and nonblocking waited on by polling
 * (MPI_Iallgather + MPI_Test, as distgn's communicator does). Every
 * repetition starts after a barrier; each rank keeps its times, rank 0
 * prints, per operation and payload, one JSON line with the median and
 * 10th/90th percentiles of the slowest rank's time per repetition.
 *
 * --nap US > 0 waits for every operation (and the barrier) by MPI_Test and a
 * sleep of US microseconds between tests, instead of MPI's busy polling: with
 * more ranks than cores (emulated hosts on one machine), a busy rank holds a
 * core the rank it waits for needs, and every step of the collective then
 * costs a scheduler time slice (milliseconds), not the network's latency; a
 * sleeping rank gives the core up, and is woken promptly.
 *
 *   coll_bench [--cells 32,1024,...] [--reps N] [--ops allgather,allreduce,iallgather] [--nap US]
 *
 * Built by scripts/bench_nodes.sh with mpicc; not part of libdistgn. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int nap_us = 0;

/* Waits for `req`: MPI_Wait, or with --nap, MPI_Test and sleeps. */
static void wait_for(MPI_Request* req) {
  if (nap_us <= 0) {
    MPI_Wait(req, MPI_STATUS_IGNORE);
    return;
  }
  const struct timespec nap = {0, 1000L * nap_us};
  int done = 0;
  for (;;) {
    MPI_Test(req, &done, MPI_STATUS_IGNORE);
    if (done) return;
    nanosleep(&nap, NULL);
  }
}

static int cmp(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const char* cells_arg = "32,128,512,2048,8192,32768";
  const char* ops_arg = "allgather,allreduce,iallgather";
  int reps = 100;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--cells")) cells_arg = argv[i + 1];
    else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--ops")) ops_arg = argv[i + 1];
    else if (!strcmp(argv[i], "--nap")) nap_us = atoi(argv[i + 1]);
  }
  int warmup = reps / 10 + 2;
  char* cells_copy = strdup(cells_arg);
  for (char* tok = strtok(cells_copy, ","); tok; tok = strtok(NULL, ",")) {
    long cells = atol(tok);
    size_t n = (size_t)(1 + 3 * cells);
    double* in = calloc(n, sizeof(double));
    double* out = calloc(n * (size_t)size, sizeof(double));
    double* t = calloc((size_t)reps, sizeof(double));
    double* slowest = calloc((size_t)reps, sizeof(double));
    for (size_t k = 0; k < n; ++k) in[k] = rank + 1e-3 * (double)k;
    char* ops_copy = strdup(ops_arg);
    char* save = NULL;
    for (char* op = strtok_r(ops_copy, ",", &save); op; op = strtok_r(NULL, ",", &save)) {
      for (int r = 0; r < warmup + reps; ++r) {
        MPI_Request req;
        if (nap_us > 0) {
          MPI_Ibarrier(MPI_COMM_WORLD, &req);
          wait_for(&req);
        } else {
          MPI_Barrier(MPI_COMM_WORLD);
        }
        double start = MPI_Wtime();
        if (!strcmp(op, "allgather")) {
          if (nap_us > 0) {
            MPI_Iallgather(in, (int)n, MPI_DOUBLE, out, (int)n, MPI_DOUBLE, MPI_COMM_WORLD, &req);
            wait_for(&req);
          } else {
            MPI_Allgather(in, (int)n, MPI_DOUBLE, out, (int)n, MPI_DOUBLE, MPI_COMM_WORLD);
          }
        } else if (!strcmp(op, "allreduce")) {
          if (nap_us > 0) {
            MPI_Iallreduce(in, out, (int)n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD, &req);
            wait_for(&req);
          } else {
            MPI_Allreduce(in, out, (int)n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
          }
        } else if (!strcmp(op, "iallgather")) {
          int done = 0;
          MPI_Iallgather(in, (int)n, MPI_DOUBLE, out, (int)n, MPI_DOUBLE, MPI_COMM_WORLD, &req);
          while (!done) MPI_Test(&req, &done, MPI_STATUS_IGNORE);
        } else {
          if (rank == 0) fprintf(stderr, "coll_bench: unknown op %s\n", op);
          MPI_Abort(MPI_COMM_WORLD, 2);
        }
        if (r >= warmup) t[r - warmup] = MPI_Wtime() - start;
      }
      MPI_Reduce(t, slowest, reps, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
      if (rank == 0) {
        qsort(slowest, (size_t)reps, sizeof(double), cmp);
        printf("{\"op\": \"%s\", \"ranks\": %d, \"cells\": %ld, \"payload_bytes\": %zu, \"reps\": %d, "
               "\"nap_us\": %d, \"median_us\": %.3f, \"p10_us\": %.3f, \"p90_us\": %.3f, \"min_us\": %.3f}\n",
               op, size, cells, n * sizeof(double), reps, nap_us, 1e6 * slowest[reps / 2], 1e6 * slowest[reps / 10],
               1e6 * slowest[(reps * 9) / 10], 1e6 * slowest[0]);
        fflush(stdout);
      }
    }
    free(ops_copy);
    free(in); free(out); free(t); free(slowest);
  }
  free(cells_copy);
  MPI_Finalize();
  return 0;
}
