// Drives an omx node with the official Ollama JavaScript client and prints what
// it saw as one JSON object; tests/test_integrations.py makes the assertions.
//   node tests/js/check.mjs http://127.0.0.1:PORT MODEL
import { Ollama } from 'ollama'

const [host, model] = process.argv.slice(2)
if (!host || !model) {
  console.error('usage: node check.mjs HOST MODEL')
  process.exit(2)
}
const client = new Ollama({ host })
const options = { temperature: 0, seed: 42, num_predict: 6 }
const messages = [{ role: 'user', content: 'the cat' }]

const chat = await client.chat({ model, messages, options, stream: false })

const chatParts = []
for await (const part of await client.chat({ model, messages, options, stream: true })) {
  chatParts.push(part)
}

const generateParts = []
for await (const part of await client.generate({ model, prompt: 'the cat', options, stream: true })) {
  generateParts.push(part)
}

const embed = await client.embed({ model, input: ['hello world', 'the cat'] })
const ps = await client.ps()

console.log(JSON.stringify({ chat, chatParts, generateParts, embed, ps }))
