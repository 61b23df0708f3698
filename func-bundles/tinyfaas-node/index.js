// A tinyFaaS nodejs function, unchanged: an Express-style (req, res)
// handler; req.body is the body as a string.
module.exports = (req, res) => {
  const n = parseInt(req.body, 10);
  if (Number.isNaN(n) || n < 2) {
    res.status(400).send('send an integer >= 2');
    return;
  }
  const primes = [];
  const sieve = new Array(n + 1).fill(true);
  for (let i = 2; i <= n; i++) {
    if (!sieve[i]) continue;
    primes.push(i);
    for (let j = i * i; j <= n; j += i) sieve[j] = false;
  }
  res.json({ n, primes: primes.length, largest: primes[primes.length - 1] });
};
