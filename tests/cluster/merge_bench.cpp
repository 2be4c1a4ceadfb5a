// The host-side cost of the forward's merge: after the allgather, every rank
// folds the P gathered records of C cells in rank order (merge_in_rank_order,
// src/core/group_exchange.cpp), P*C Chan merges, a cost that grows with P as
// the payload does. Times the library's own function over P ranks x C cells
// and prints one JSON line per (P, C): the median ns per call and per merge.
//
//   merge_bench [--ranks 8,64,256,1024] [--cells 32,2048] [--reps 200]
//
// Built by scripts/bench_nodes.sh against build-nodes' libdistgn.a.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "core/group_exchange.hpp"

static std::vector<long> list(const char* s) {
  std::vector<long> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(std::atol(item.c_str()));
  return out;
}

int main(int argc, char** argv) {
  const char* ranks_arg = "8,64,256,1024";
  const char* cells_arg = "32,2048";
  int reps = 200;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--ranks")) ranks_arg = argv[i + 1];
    if (!std::strcmp(argv[i], "--cells")) cells_arg = argv[i + 1];
    if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(argv[i + 1]);
  }
  for (long cells : list(cells_arg)) {
    for (long ranks : list(ranks_arg)) {
      const size_t stride = 1 + 3 * size_t(cells);
      std::vector<double> gathered(stride * size_t(ranks));
      for (long r = 0; r < ranks; ++r) {
        gathered[size_t(r) * stride] = 0;  // the flag
        for (long c = 0; c < cells; ++c) {
          double* m = &gathered[size_t(r) * stride + 1 + 3 * size_t(c)];
          m[0] = 1000 + r % 7;
          m[1] = 0.5 + 1e-3 * double(r) + 1e-6 * double(c);
          m[2] = 900 + double(r % 13);
        }
      }
      std::vector<distgn::CellMoments> out(static_cast<size_t>(cells));
      std::vector<double> t;
      double sink = 0;
      for (int i = 0; i < reps + 5; ++i) {
        const auto start = std::chrono::steady_clock::now();
        distgn::merge_in_rank_order(gathered.data() + 1, stride, int(ranks), cells, out.data());
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        sink += out[0].m2;
        if (i >= 5) t.push_back(s);
      }
      std::sort(t.begin(), t.end());
      const double med = t[t.size() / 2];
      std::printf("{\"kind\": \"merge\", \"ranks\": %ld, \"cells\": %ld, \"median_us\": %.3f, \"ns_per_merge\": %.3f, "
                  "\"sink\": %.1f}\n",
                  ranks, cells, med * 1e6, med * 1e9 / double(ranks * cells), sink > 0 ? 1.0 : 0.0);
    }
  }
  return 0;
}
